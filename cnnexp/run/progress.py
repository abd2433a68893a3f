"""Progress of an epoch: a tqdm bar on a terminal, plain log lines elsewhere (trainer.progress)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

log = logging.getLogger("cnnexp")


class Progress:
    """A tqdm bar per epoch on a terminal, plain log lines elsewhere."""

    def __init__(self, mode: str, log_every: int, steps_per_epoch: int, show_loss: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.log_every, self.total, self.show_loss = mode, log_every, steps_per_epoch, show_loss
        self.bar = None
        self.every = min(log_every, 100) if mode == "bar" else log_every

    def start(self, epoch: int, max_epochs: int, start_step: int) -> None:
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=start_step, desc=f"epoch {epoch}/{max_epochs}",
                            unit="step", leave=False, dynamic_ncols=True)
        self.epoch, self.last = epoch, start_step

    def update(self, step: int, running_loss: Callable[[], float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.last)
            if self.show_loss:
                self.bar.set_postfix(loss=f"{running_loss():.3f}", refresh=False)
        elif self.mode == "log" and step % self.log_every == 0:
            loss = f"loss {running_loss():.3f}" if self.show_loss else ""
            log.info("[epoch %d, step %5d] %s", self.epoch, step, loss)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
