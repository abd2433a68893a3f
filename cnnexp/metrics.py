"""metrics.csv: one row per epoch, appended and flushed as each epoch ends,
so a crash or a kill loses at most the epoch in progress."""

from __future__ import annotations

import csv
import os
from pathlib import Path

COLUMNS = [
    "epoch",
    "train_loss",  # mean over the epoch's batches, as the original printed it
    "train_acc",  # fraction of training samples classified right during the epoch
    "test_loss",
    "test_acc",
    "lr",
    "epoch_seconds",  # training and evaluation
    "train_samples_per_s",
]
TIMING_COLUMNS = {"epoch_seconds", "train_samples_per_s"}
VAL_COLUMNS = ["val_loss", "val_acc"]  # only in runs with a validation split (data.val_size)
COLUMNS_WITH_VAL = [*COLUMNS[:3], *VAL_COLUMNS, *COLUMNS[3:]]


class MetricsCSV:
    def __init__(self, path: Path, with_val: bool = False):
        self.path = Path(path)
        self.columns = COLUMNS_WITH_VAL if with_val else COLUMNS

    def rewrite(self, rows: list[dict]) -> None:
        """Start the file afresh with these rows (a new run, or a resume)."""
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)
            f.flush()
            os.fsync(f.fileno())
