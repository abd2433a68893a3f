"""Early stopping (trainer.early_stopping): whether the metrics rows so far say stop.

The decision is a function of the rows alone, so a resumed run decides
exactly as the uninterrupted one would, with nothing extra in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EarlyStopping:
    monitor: str  # a metrics column: val_acc, val_loss, test_acc or test_loss
    patience: int  # epochs without an improvement of more than min_delta before stopping
    min_delta: float = 0.0

    @property
    def higher_is_better(self) -> bool:
        return self.monitor.endswith("_acc")

    def best_epoch(self, rows: list[dict]) -> int | None:
        """The epoch of the last improvement (by more than min_delta) over the best so far."""
        best, best_epoch = None, None
        for row in rows:
            value = float(row[self.monitor])
            gain = (value - best) if best is not None and self.higher_is_better else \
                (best - value) if best is not None else None
            if best is None or gain > self.min_delta:
                best, best_epoch = value, int(row["epoch"])
        return best_epoch

    def should_stop(self, rows: list[dict]) -> bool:
        if self.patience <= 0 or not rows:
            return False
        return int(rows[-1]["epoch"]) - self.best_epoch(rows) >= self.patience


def monitored_metric(monitor: str, has_val: bool) -> str:
    """The column trainer.early_stopping.monitor=auto means."""
    if monitor != "auto":
        return monitor
    return "val_acc" if has_val else "test_acc"
