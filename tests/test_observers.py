"""Observers hear of a run's start, steps and epochs, and may end it as a normal outcome."""

from __future__ import annotations

import csv

import pytest
import torch

from cnnexp.observers import Observers, RunObserver, StopRun
from cnnexp.run.loop import train
from conftest import SMALL


class Recorder(RunObserver):
    def __init__(self, stop_after_epoch: int | None = None):
        self.calls, self.stop_after_epoch = [], stop_after_epoch

    def on_start(self, cfg, run_dir, rows):
        self.calls.append(("start", len(rows)))

    def on_step(self, epoch, step, running_loss):
        self.calls.append(("step", epoch, step, running_loss))

    def on_epoch(self, row):
        self.calls.append(("epoch", row["epoch"]))
        if row["epoch"] == self.stop_after_epoch:
            raise StopRun("pruned", f"stopped after epoch {row['epoch']}")


def test_observers_hear_start_steps_and_epochs(compose_cfg, tmp_path):
    cfg = compose_cfg([*SMALL, "trainer.max_epochs=2", "trainer.log_every_steps=40", "trainer.device=cpu",
                       "trainer.progress=none"])
    recorder = Recorder()
    train(cfg, tmp_path, torch.device("cpu"), lambda: None, observers=Observers([recorder]))
    steps = [c for c in recorder.calls if c[0] == "step"]
    # 400 images at batch 4: 100 steps per epoch, reported at steps 40 and 80 of each epoch.
    assert [(e, s) for _, e, s, _ in steps] == [(1, 40), (1, 80), (2, 40), (2, 80)]
    assert all(loss > 0 for *_, loss in steps)
    assert recorder.calls[0] == ("start", 0)
    assert [c for c in recorder.calls if c[0] == "epoch"] == [("epoch", 1), ("epoch", 2)]


def test_stop_run_ends_after_the_epoch_with_its_row_on_disk(compose_cfg, tmp_path):
    cfg = compose_cfg([*SMALL, "trainer.max_epochs=3", "trainer.device=cpu", "trainer.progress=none"])
    with pytest.raises(StopRun) as stop:
        train(cfg, tmp_path, torch.device("cpu"), lambda: None, observers=Observers([Recorder(stop_after_epoch=1)]))
    assert stop.value.status == "pruned"
    with open(tmp_path / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1"]


def test_only_observers_that_define_on_step_make_the_loop_report_steps():
    assert not Observers([RunObserver()]).wants_steps()
    assert Observers([RunObserver(), Recorder()]).wants_steps()
