"""Documented behaviour of a single run, checked in this process: where the
cache lives, the progress bar and log lines, trainer.deterministic, a run
whose plots fail, and a bug inside a run (one line, the traceback in the log).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from cnnexp.cpu import cache_dir
from cnnexp.run.job import run_job
from cnnexp.run.progress import Progress
from conftest import SMALL, write_module

TINY = [*SMALL, "data.n_train=40", "data.n_test=20", "trainer.max_epochs=1", "trainer.device=cpu",
        "trainer.progress=none", "trainer.num_threads=1", "trainer.cpu_step=eager"]


# ------------------------------------------------------------------ the cache dir
def test_the_cache_dir_follows_cnnexp_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNEXP_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.delenv("CNNEXP_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "cnnexp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cnnexp"


# ------------------------------------------------------------------ progress
def losses(values):
    """A running-loss callable per step, as the engine hands them to Progress."""
    return lambda: values.pop(0)


def test_progress_bar_counts_the_steps_and_shows_the_loss(capsys):
    progress = Progress("bar", log_every=2000, steps_per_epoch=250, show_loss=True)
    assert progress.every == 100  # the bar moves at least every 100 steps, whatever log_every_steps says
    progress.start(epoch=2, max_epochs=3, start_step=50)  # a resumed epoch starts part-way
    progress.update(100, lambda: 2.25)
    progress.update(200, lambda: 1.5)
    bar = progress.bar
    assert (bar.n, bar.total, bar.desc, bar.postfix) == (200, 250, "epoch 2/3", "loss=1.500")
    progress.close()
    assert "epoch 2/3" in capsys.readouterr().err  # drawn on stderr
    assert progress.bar is None and bar.disable  # closed, so the next epoch's bar starts clean


def test_progress_log_lines_every_log_every_steps(caplog):
    caplog.set_level(logging.INFO, logger="cnnexp")
    progress = Progress("log", log_every=5, steps_per_epoch=12, show_loss=True)
    progress.start(epoch=1, max_epochs=1, start_step=0)
    for step, loss in ((5, 2.3), (10, 2.1)):
        progress.update(step, lambda v=loss: v)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["[epoch 1, step     5] loss 2.300", "[epoch 1, step    10] loss 2.100"]
    silent = Progress("none", log_every=5, steps_per_epoch=12, show_loss=True)
    silent.start(1, 1, 0)
    silent.update(5, lambda: pytest.fail("no loss is computed for progress=none"))
    assert len(caplog.records) == 2


# ------------------------------------------------------------------ trainer.deterministic
@pytest.fixture
def deterministic_off():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_switches_torch_to_deterministic_algorithms(compose_cfg, deterministic_off):
    from cnnexp.run.build import build

    torch.use_deterministic_algorithms(False)
    build(compose_cfg(TINY), torch.device("cpu"), None)
    assert not torch.are_deterministic_algorithms_enabled()  # off unless asked
    build(compose_cfg([*TINY, "trainer.deterministic=true"]), torch.device("cpu"), None)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # a warning, not an error, where none exists


# ------------------------------------------------------------------ plots that fail, and a bug
def test_a_run_whose_plots_fail_completes_and_says_how_to_redraw(compose_cfg, tmp_path, monkeypatch, caplog):
    from cnnexp.run import job

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(job, "render_run", broken)
    caplog.set_level(logging.WARNING, logger="cnnexp")
    assert run_job(compose_cfg(TINY), tmp_path, False, []) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"Plots not drawn (no display); redraw them later with: python -m cnnexp.plot {tmp_path}"]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "completed" and record["epochs_completed"] == 1
    assert (tmp_path / "model.pt").is_file() and not list(tmp_path.glob("plots/*.png"))


BUGGY = """
from cnnexp.models import TutorialCNN

class Buggy(TutorialCNN):
    trained = False

    def forward(self, x):
        if self.training and x.shape[0] > 1:
            Buggy.trained = True
        elif Buggy.trained:  # the first evaluation after training
            raise ZeroDivisionError("a bug in the model")
        return super().forward(x)
"""


@pytest.fixture
def run_log(tmp_path):
    """The run's cnnexp.log handler, as Hydra installs it for a real run."""
    handler = logging.FileHandler(tmp_path / "cnnexp.log")
    logging.getLogger().addHandler(handler)
    yield tmp_path / "cnnexp.log"
    logging.getLogger().removeHandler(handler)
    handler.close()


def test_a_bug_in_a_single_run_is_one_line_and_its_traceback_in_the_log(compose_cfg, tmp_path, monkeypatch,
                                                                          caplog, run_log):
    write_module(tmp_path, "buggy_model", BUGGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    caplog.set_level(logging.ERROR, logger="cnnexp")
    code = run_job(compose_cfg([*TINY, "model._target_=buggy_model.Buggy"]), tmp_path, False, [])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "cnnexp"
              and not r.getMessage().startswith("Unexpected error")]
    assert errors == [f"error: unexpected ZeroDivisionError: a bug in the model (a bug; the traceback is in "
                      f"{tmp_path / 'cnnexp.log'})"]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == "ZeroDivisionError: a bug in the model"
    log_text = Path(run_log).read_text()
    assert "Traceback (most recent call last)" in log_text
    assert re.search(r'buggy_model\.py", line \d+, in forward', log_text)
