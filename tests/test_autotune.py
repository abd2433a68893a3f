"""The CPU step is chosen by timing, cached per machine and model, and overridable."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from cnnexp.data import Normalizer
from cnnexp.engine import autotune
from cnnexp.models import TutorialCNN

SGD = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.001, "momentum": 0.9,
                        "weight_decay": 0.0, "nesterov": False})


def trainer(**overrides):
    return OmegaConf.create({"num_threads": None, "fast_path": True, "cpu_step": "eager", **overrides})


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 10, (4,), generator=g)


def plan(tmp_path, batch, model=None, budget=2, **trainer_overrides):
    x, y = batch
    model = model or TutorialCNN()
    return autotune.plan_cpu_step(model, SGD, trainer(**trainer_overrides), x, y,
                                  prepare=Normalizer([0.5] * 3, [0.5] * 3, 3, "cpu"),
                                  num_classes=model.fc3.out_features, budget=budget,
                                  cache_file=tmp_path / "plans.json", seconds=0.1)


def test_choice_is_timed_once_then_read_from_the_cache(tmp_path, batch, monkeypatch):
    first = plan(tmp_path, batch)
    assert first.chosen_by == "measured"
    assert set(first.ms_per_step) == {"eager, 1 thread", "eager, 2 threads", "eager, 1 thread, oneDNN",
                                      "eager, 2 threads, oneDNN"} or not torch.backends.mkldnn.is_available()
    assert first.label == min(first.ms_per_step, key=first.ms_per_step.get)  # the fastest won
    cached = json.loads((tmp_path / "plans.json").read_text())
    assert [entry["threads"] for entry in cached["plans"].values()] == [first.threads]

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again although the choice was cached")

    monkeypatch.setattr(autotune, "time_candidates", no_timing)
    second = plan(tmp_path, batch)
    assert second.chosen_by == "cache"
    assert (second.threads, second.onednn, second.kernel) == (first.threads, first.onednn, first.kernel)
    with pytest.raises(AssertionError, match="timed again"):  # another core budget is another machine share
        plan(tmp_path, batch, budget=1)


def test_another_model_or_batch_is_timed_anew(tmp_path, batch):
    plan(tmp_path, batch)
    plan(tmp_path, batch, model=TutorialCNN(num_classes=12))
    plan(tmp_path, (batch[0][:2], batch[1][:2]))
    assert len(json.loads((tmp_path / "plans.json").read_text())["plans"]) == 3


def test_explicit_num_threads_wins_without_timing(tmp_path, batch, monkeypatch):
    monkeypatch.setattr(autotune, "time_candidates", lambda *a, **k: pytest.fail("timed despite num_threads"))
    chosen = plan(tmp_path, batch, num_threads=2)
    assert (chosen.threads, chosen.kernel, chosen.chosen_by) == (2, "eager", "config")
    assert not (tmp_path / "plans.json").exists()


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "plans": []}', '{"format": 1, "plans": {"k": 3}}',
                                     "[1, 2]", ""])
def test_a_corrupt_cache_is_ignored_and_replaced(tmp_path, batch, content):
    (tmp_path / "plans.json").write_text(content)
    chosen = plan(tmp_path, batch)
    assert chosen.chosen_by == "measured"
    assert plan(tmp_path, batch).chosen_by == "cache"


def test_a_resumed_run_keeps_the_step_it_started_with(tmp_path, batch, monkeypatch):
    monkeypatch.setattr(autotune, "time_candidates", lambda *a, **k: pytest.fail("timed on resume"))
    previous = {"threads": 2, "onednn": True, "kernel": "eager"}
    x, y = batch
    resumed = autotune.plan_cpu_step(TutorialCNN(), SGD, trainer(), x, y, prepare=None, num_classes=10, budget=2,
                                     previous=previous,
                                     cache_file=tmp_path / "plans.json")
    assert (resumed.threads, resumed.onednn, resumed.kernel, resumed.chosen_by) == (2, True, "eager", "checkpoint")


def test_thread_counts_cover_the_budget():
    assert autotune.thread_counts(1) == [1]
    assert autotune.thread_counts(2) == [1, 2]
    assert autotune.thread_counts(6) == [1, 2, 4, 6]
    assert autotune.thread_counts(8) == [1, 2, 4, 8]


@pytest.mark.slow
def test_a_run_records_its_step_and_the_next_run_reuses_it(tmp_path):
    from conftest import SMALL, run_cli

    env = {"CNNEXP_CACHE_DIR": str(tmp_path / "cache")}
    records = []
    for name in ("first", "second"):
        proc = run_cli([*SMALL, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        records.append(json.loads((tmp_path / name / "run.json").read_text())["cpu_step"])
    assert records[0]["chosen_by"] == "measured" and len(records[0]["ms_per_step"]) >= 2
    assert records[1]["chosen_by"] == "cache"
    assert {k: records[1][k] for k in ("threads", "onednn", "kernel")} == \
        {k: records[0][k] for k in ("threads", "onednn", "kernel")}
    assert (tmp_path / "cache" / "step_plans.json").is_file()
