"""The tracker interface, and the observer that runs trackers without ever risking the run.

A Tracker talks to one tool. Tracking (a RunObserver) calls every tracker at
the run's start, every trainer.log_every_steps steps, every epoch and the end.
The first exception a tracker raises switches it off for the rest of the run,
with one warning; training goes on and run.json's "tracking" entry says which
tracker stopped, why, and after which epoch. Each tracker's state (the last
epoch it holds, the MLflow run id, ...) lives in run.json too, so a resumed run
continues the same TensorBoard directory and MLflow run, logs each epoch once,
and fills in epochs a failed tracker missed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from cnnexp.observers import RunObserver

log = logging.getLogger("cnnexp")


class Tracker:
    """One tracking tool. `state` is this tracker's entry in run.json, kept across resumes."""

    name = "tracker"

    def start(self, cfg: DictConfig, run_dir: Path, state: dict, steps_per_epoch: int | None,
              epochs_done: int) -> None:
        """Open (or, with ids in `state`, reopen) the run; record ids in `state`."""

    def log_step(self, global_step: int, running_loss: float) -> None:
        """The running training loss at a step on the run-wide axis."""

    def log_epoch(self, row: dict) -> None:
        """One metrics.csv row, with the epoch as the step."""

    def finish(self, status: str, run_dir: Path) -> None:
        """The run ended with `status` (run.json is final): figures, artifacts, close."""


class Tracking(RunObserver):
    """Runs the trackers; a failing tracker is switched off, never the run."""

    def __init__(self, trackers: list[Tracker], previous: dict | None = None):
        self.trackers = list(trackers)
        previous = previous or {}
        self.state = {t.name: dict(previous.get(t.name) or {}) for t in self.trackers}
        self.failed: set[str] = set()
        self.started: set[str] = set()
        self.record = None

    def bind(self, record) -> Tracking:
        """Keep this run's tracking state in `record` (run.json)."""
        self.record = record
        self._save()
        return self

    # ------------------------------------------------------------ observer hooks
    def on_start(self, cfg, run_dir, rows):
        for tracker in self.trackers:
            state = self.state[tracker.name]
            state.pop("error", None)
            state["ok"] = True
            last = int(state.get("last_epoch", 0))
            state["last_epoch"] = min(last, len(rows))  # epochs past the checkpoint are trained again
            if self._call(tracker, "start", cfg, run_dir, state, self.steps_per_epoch, len(rows)):
                self.started.add(tracker.name)
                for row in rows:  # epochs this tracker missed before a resume
                    self._log_epoch(tracker, row)
        self._save()

    def on_step(self, epoch, step, running_loss):
        if not self.steps_per_epoch:
            return
        global_step = (epoch - 1) * self.steps_per_epoch + step
        for tracker in self._live():
            self._call(tracker, "log_step", global_step, running_loss)

    def on_epoch(self, row):
        for tracker in self._live():
            self._log_epoch(tracker, row)
        self._save()

    def on_finish(self, status, run_dir):
        for tracker in self._live():
            if tracker.name not in self.started:  # the run failed before training began
                continue
            self._call(tracker, "finish", status, Path(run_dir))
        self._save()

    # ------------------------------------------------------------ helpers
    def _live(self) -> list[Tracker]:
        return [t for t in self.trackers if t.name not in self.failed]

    def _log_epoch(self, tracker: Tracker, row: dict) -> None:
        state = self.state[tracker.name]
        if tracker.name in self.failed or row["epoch"] <= state.get("last_epoch", 0):
            return
        if self._call(tracker, "log_epoch", row):
            state["last_epoch"] = row["epoch"]

    def _call(self, tracker: Tracker, method: str, *args) -> bool:
        try:
            getattr(tracker, method)(*args)
            return True
        except Exception as err:  # any tracker failure: note it once, keep training
            self.failed.add(tracker.name)
            state = self.state[tracker.name]
            state["ok"] = False
            state["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
            log.warning("%s logging stopped (%s); training goes on, metrics.csv is complete, and run.json "
                        "notes what %s is missing (resuming the run fills in missed epochs).",
                        tracker.name, state["error"], tracker.name)
            self._save()
            return False

    def complete(self) -> bool:
        return not self.failed

    def _save(self) -> None:
        if self.record is not None:
            self.record.update(tracking={"complete": self.complete(), **self.state})
