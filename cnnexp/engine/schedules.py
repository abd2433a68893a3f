"""Learning-rate schedules: the rate for each epoch of a run (trainer.lr_schedule)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def learning_rate(base_lr: float, schedule: str, epoch: int, max_epochs: int) -> float:
    """The learning rate for 1-based `epoch`."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max_epochs))
    return base_lr
