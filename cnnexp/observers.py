"""Observers: what watches a run while it trains, besides metrics.csv.

The run record, live trackers (TensorBoard, MLflow) and a search's pruner all
follow a run at the same few points, so they share one small interface.
run/job.py builds the list for a run; run/loop.py calls it. metrics.csv and the
checkpoint are written before any observer hears of an epoch, so an observer
can never cost a row. An observer whose failure is harmless (a tracker)
catches its own errors; an observer that raises StopRun from on_epoch ends
the run cleanly with the status it carries (a pruned trial, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig


class StopRun(Exception):
    """Ends a run after a completed epoch, as a normal outcome (not a failure)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


class RunObserver:
    """Every hook is optional; the defaults do nothing."""

    # Set before on_start: with it, on_step's (epoch, step) is a point on one
    # run-wide axis, (epoch - 1) * steps_per_epoch + step.
    steps_per_epoch: int | None = None

    def on_start(self, cfg: DictConfig, run_dir: Path, rows: list[dict]) -> None:
        """Training is about to start; `rows` holds the epochs a resumed run already has."""

    def on_step(self, epoch: int, step: int, running_loss: float) -> None:
        """Every trainer.log_every_steps steps: the mean training loss of the epoch so far."""

    def on_epoch(self, row: dict) -> None:
        """An epoch ended and its metrics.csv row (the same dict) is on disk."""

    def on_finish(self, status: str, run_dir: Path) -> None:
        """The run ended (completed, failed, interrupted, pruned, ...); run.json holds how."""


class Observers(RunObserver):
    """Several observers called in order, as one."""

    def __init__(self, observers: Sequence[RunObserver] = ()):
        self.observers = list(observers)

    def wants_steps(self) -> bool:
        return any(type(o).on_step is not RunObserver.on_step for o in self.observers)

    def on_start(self, cfg, run_dir, rows):
        for o in self.observers:
            o.steps_per_epoch = self.steps_per_epoch
            o.on_start(cfg, run_dir, rows)

    def on_step(self, epoch, step, running_loss):
        for o in self.observers:
            o.on_step(epoch, step, running_loss)

    def on_epoch(self, row):
        for o in self.observers:
            o.on_epoch(row)

    def on_finish(self, status, run_dir):
        for o in self.observers:
            o.on_finish(status, run_dir)
