"""The compiled CPU step is offered, chosen and kept: by the tuner when it is
fastest, by trainer.cpu_step=compiled, and by a resumed run whose plan used it.

The tuner's timing is replaced by fixed numbers, so which candidate wins is
decided by the test, not by the machine's load.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

from cnnexp.data import Normalizer
from cnnexp.engine import autotune
from cnnexp.models import TutorialCNN
from cnnexp.run.job import run_job
from conftest import SMALL, rows_without_timing

SGD = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.001, "momentum": 0.9,
                        "weight_decay": 0.0, "nesterov": False})
COMPILED_LABEL = "compiled, 1 thread"


@pytest.fixture
def timings(monkeypatch, tmp_path, compiled_library):
    """Replaces the timing: records the candidates offered, answers with `timings.ms` (label -> ms).
    Step plans go to a cache of this test's own, so no earlier run's choice is read back."""
    monkeypatch.setenv("CNNEXP_CACHE_DIR", str(tmp_path / "cache"))  # the library is loaded already

    class Fake:
        offered: list[list[str]] = []
        ms: dict[str, float] = {}

        def __call__(self, candidates, seconds=1.5, rounds=3):
            labels = [c.label for c in candidates]
            self.offered.append(labels)
            for c in candidates:  # each candidate must really build and take a step
                c.make_step()()
            return {label: self.ms.get(label, 5.0) for label in labels}

    fake = Fake()
    fake.offered, fake.ms = [], {}
    monkeypatch.setattr(autotune, "time_candidates", fake)
    return fake


def plan(tmp_path, budget=2, previous=None, **trainer):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    trainer_cfg = OmegaConf.create({"num_threads": None, "fast_path": True, "cpu_step": "auto", **trainer})
    return autotune.plan_cpu_step(TutorialCNN(), SGD, trainer_cfg, x, y, prepare=Normalizer([0.5] * 3, [0.5] * 3, 3,
                                                                                            "cpu"),
                                  num_classes=10, budget=budget, previous=previous,
                                  cache_file=tmp_path / "plans.json", seconds=0.05)


def eager_labels(budget):
    onednn = [False, True] if torch.backends.mkldnn.is_available() else [False]
    return [autotune.candidate_label("eager", t, o) for t in autotune.thread_counts(budget) for o in onednn]


def test_the_tuner_offers_the_compiled_step_and_takes_it_when_fastest(tmp_path, compiled_library, timings):
    timings.ms = {COMPILED_LABEL: 0.3, "eager, 1 thread": 1.0}
    chosen = plan(tmp_path)
    assert timings.offered == [[*eager_labels(2), COMPILED_LABEL]]
    assert (chosen.kernel, chosen.threads, chosen.onednn, chosen.chosen_by) == ("compiled", 1, False, "measured")
    assert chosen.ms_per_step[COMPILED_LABEL] == 0.3 and chosen.label == COMPILED_LABEL
    cached = plan(tmp_path)  # the next run reads the choice back
    assert (cached.kernel, cached.chosen_by) == ("compiled", "cache") and len(timings.offered) == 1


def test_the_tuner_takes_the_eager_step_when_it_is_fastest(tmp_path, compiled_library, timings):
    timings.ms = {COMPILED_LABEL: 2.0, "eager, 2 threads": 0.5}
    chosen = plan(tmp_path)
    assert COMPILED_LABEL in timings.offered[0]
    assert (chosen.kernel, chosen.threads, chosen.onednn) == ("eager", 2, False)


def test_cpu_step_compiled_is_taken_without_timing(tmp_path, compiled_library, timings):
    chosen = plan(tmp_path, cpu_step="compiled")
    assert (chosen.kernel, chosen.threads, chosen.chosen_by) == ("compiled", 1, "config")
    assert timings.offered == []
    one_thread = plan(tmp_path, cpu_step="compiled", num_threads=1)
    assert (one_thread.kernel, one_thread.threads, one_thread.chosen_by) == ("compiled", 1, "config")
    two = plan(tmp_path, cpu_step="compiled", num_threads=2)  # the compiled step runs on one thread
    assert (two.kernel, two.threads) == ("eager", 2)
    eager = plan(tmp_path, cpu_step="eager")
    assert eager.kernel == "eager" and COMPILED_LABEL not in timings.offered[-1]


def test_a_resumed_compiled_plan_stays_compiled(tmp_path, compiled_library, timings):
    previous = {"threads": 1, "onednn": False, "kernel": "compiled"}
    resumed = plan(tmp_path, previous=previous)
    assert (resumed.kernel, resumed.threads, resumed.onednn, resumed.chosen_by) == (
        "compiled", 1, False, "checkpoint")
    assert timings.offered == []


# ------------------------------------------------------------------ through run_job, as the CLI runs it
RUN = [*SMALL, "data.n_train=80", "data.n_test=40", "trainer.device=cpu", "trainer.progress=none",
       "optim.lr=0.01"]


@pytest.fixture
def compiled_steps(monkeypatch):
    """Counts the training steps the compiled stepper takes (the Engine calls step_slice)."""
    from cnnexp.engine.kernels import CompiledStepper

    calls = []
    original = CompiledStepper.step_slice

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CompiledStepper, "step_slice", counted)
    return calls


def test_a_run_trains_with_the_step_the_tuner_chose(compose_cfg, tmp_path, compiled_library, timings, caplog,
                                                     compiled_steps):
    timings.ms = {COMPILED_LABEL: 0.1}
    caplog.set_level(logging.INFO, logger="cnnexp")
    assert run_job(compose_cfg([*RUN, "trainer.max_epochs=1"]), tmp_path, False, []) == 0
    step = json.loads((tmp_path / "run.json").read_text())["cpu_step"]
    assert (step["kernel"], step["threads"], step["chosen_by"]) == ("compiled", 1, "measured")
    assert step["ms_per_step"][COMPILED_LABEL] == 0.1
    assert "flat SGD, compiled step" in caplog.text
    assert len(compiled_steps) == 20  # the loop really trains with it: 80 images at batch 4


def test_cpu_step_compiled_and_its_resume(compose_cfg, tmp_path, compiled_library, timings, log_handlers,
                                          compiled_steps):
    whole, split = tmp_path / "whole", tmp_path / "split"
    compiled = [*RUN, "trainer.cpu_step=compiled"]
    assert run_job(compose_cfg([*compiled, "trainer.max_epochs=2"]), whole, False, []) == 0
    assert run_job(compose_cfg([*compiled, "trainer.max_epochs=1"]), split, False, []) == 0
    first = json.loads((split / "run.json").read_text())["cpu_step"]
    assert (first["kernel"], first["chosen_by"]) == ("compiled", "config")
    again = [f"trainer.resume={split}", "trainer.max_epochs=2"]
    assert run_job(compose_cfg([*RUN, *again]), tmp_path / "elsewhere", False, again) == 0
    resumed = json.loads((split / "run.json").read_text())["cpu_step"]
    assert (resumed["kernel"], resumed["threads"], resumed["chosen_by"]) == ("compiled", 1, "checkpoint")
    assert timings.offered == []  # nothing was timed: config, then checkpoint
    assert len(compiled_steps) == 4 * 20  # 2 + 1 + 1 epochs of 20 steps, every one compiled
    assert rows_without_timing(split / "metrics.csv") == rows_without_timing(whole / "metrics.csv")
