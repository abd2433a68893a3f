"""Stopping a run on request: SIGINT/SIGTERM set a flag the loop reads between steps.

Exit codes of a single run: 0 done, 1 failed, 2 invalid config, 130/143
stopped by SIGINT/SIGTERM (checkpoint written).
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cnnexp")


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); a checkpoint has been written."""

    def __init__(self, signum: int, epoch: int, step: int, checkpointed: bool = True):
        super().__init__(f"stopped by signal {signum} in epoch {epoch} after step {step}"
                         + ("" if checkpointed else " (no checkpoint: trainer.checkpoint=false)"))
        self.signum, self.epoch, self.step = signum, epoch, step
        self.checkpointed = checkpointed  # False when trainer.checkpoint=false: nothing to resume from


class StopFlag:
    """Set by SIGINT/SIGTERM; the training loop finishes its step and stops."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self) -> int | None:
        return self.signum


@contextmanager
def graceful_stop(flag: StopFlag):
    def handler(signum, frame):
        if flag.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag.signum = signum
        log.warning("Stopping after the current step (signal %d); press Ctrl-C again to abort at once.", signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class ParallelSweepStop(Callback):
    """Ctrl-C on a sweep whose jobs run in worker processes (joblib): the workers
    get the signal too, and each job stops after its current step with a
    checkpoint. The launcher process waits for them, instead of raising
    KeyboardInterrupt and tearing the workers down mid-step; a second Ctrl-C
    aborts at once. `sweep_dir` is kept for the command's last line (cli.py)."""

    sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        ParallelSweepStop.sweep_dir = Path(config.hydra.sweep.dir)
        if "joblib" in str(OmegaConf.select(config, "hydra.launcher._target_", default="")):
            signal.signal(signal.SIGINT, _wait_for_the_jobs)


def _wait_for_the_jobs(signum, frame):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C aborts
    log.warning("Stopping the sweep: each running job saves a checkpoint after its current step; press Ctrl-C "
                "again to abort at once.")
