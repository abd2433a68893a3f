"""Learning-rate schedules (trainer.lr_schedule, trainer.warmup_epochs).

constant and cosine without warmup are the original per-epoch rules: one rate
for a whole epoch (cosine decays to 0 over the run). Every other case sets
the rate before each step, from the run's progress in epochs t (0 at the
first step, max_epochs at the end):

    warmup     t < warmup_epochs: linear from start * base (~0 by default) to base
    constant   base
    cosine     base * (1 + cos(pi * u)) / 2          u: progress after warmup, 0..1
    linear     base * (1 - u)                        to 0 at the end
    onecycle   warmup (30 % of the run if warmup_epochs is 0), then linear to 0
    step       base * 0.1 ** (number of thirds of the run passed after warmup)

with start = trainer.warmup_start_factor; cosine, linear and onecycle end at
final = trainer.final_lr_factor times base instead of 0 (the decay runs from
base to final * base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine", "onecycle", "linear", "step")
ONECYCLE_WARMUP = 0.3  # fraction of the run onecycle warms up for when warmup_epochs is 0


def learning_rate(base_lr: float, schedule: str, epoch: int, max_epochs: int) -> float:
    """The per-epoch rate for 1-based `epoch` (constant and cosine without warmup)."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max_epochs))
    return base_lr


@dataclass(frozen=True)
class Schedule:
    base_lr: float
    name: str
    max_epochs: int
    steps_per_epoch: int
    warmup_epochs: float = 0.0
    start: float = 0.0  # the first warmup step's rate, as a fraction of base_lr (plus one step's rise)
    final: float = 0.0  # the rate cosine, linear and onecycle decay to, as a fraction of base_lr

    @property
    def per_step(self) -> bool:
        return not (self.name in ("constant", "cosine") and self.warmup_epochs == 0 and self.final == 0)

    @property
    def warmup(self) -> float:
        if self.name == "onecycle" and self.warmup_epochs == 0:
            return ONECYCLE_WARMUP * self.max_epochs
        return min(float(self.warmup_epochs), float(self.max_epochs))

    def at(self, epoch: int, step: int = 0) -> float:
        """The rate of 0-based `step` of 1-based `epoch`."""
        if not self.per_step:
            return learning_rate(self.base_lr, self.name, epoch, self.max_epochs)
        t = (epoch - 1) + step / self.steps_per_epoch  # epochs done before this step
        warmup = self.warmup
        if t < warmup:
            return self.base_lr * (self.start + (1 - self.start) * (t + 1 / self.steps_per_epoch) / warmup)
        u = (t - warmup) / max(self.max_epochs - warmup, 1e-12)
        if self.name == "cosine":
            return self.base_lr * (self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * u)))
        if self.name in ("linear", "onecycle"):
            return self.base_lr * (self.final + (1 - self.final) * max(0.0, 1 - u))
        if self.name == "step":
            return self.base_lr * 0.1 ** min(2, int(3 * u))
        return self.base_lr
