"""metrics.csv: one row per epoch, appended and flushed as each epoch ends,
so a crash or a kill loses at most the epoch in progress."""

from __future__ import annotations

import csv
from pathlib import Path

from cnnexp.safeio import appending, atomic_path

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
        with atomic_path(self.path, durable=True) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)

    def append(self, row: dict) -> None:
        with appending(self.path) as f:  # a failed append leaves the earlier rows as they were
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)


def read_metrics(path: Path):
    """metrics.csv as far as it can be read, for figures and summaries of runs that
    are half-written, stopped or from an older cnnexp.

    Returns (frame or None, problem or None): the rows with a numeric epoch, all
    values as numbers (NaN where a value is missing or garbled), and a short note
    on what is missing or was dropped."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        frame = pd.read_csv(path, on_bad_lines="skip")
    except pd.errors.EmptyDataError:
        return None, f"{path.name} is empty (the run stopped before writing its header)"
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        return None, f"{path.name} cannot be read ({str(err).splitlines()[0]})"
    if "epoch" not in frame.columns:
        return None, f"{path.name} has no epoch column (columns: {', '.join(map(str, frame.columns)) or 'none'})"
    frame = frame.apply(pd.to_numeric, errors="coerce")
    dropped = int(frame["epoch"].isna().sum())
    frame = frame.dropna(subset=["epoch"])
    if not len(frame):
        return None, f"{path.name} has no rows yet (the run stopped before its first epoch ended)"
    known = [c for c in COLUMNS if c in frame.columns and c not in TIMING_COLUMNS]
    if frame[known].iloc[-1].isna().any():  # a row cut short by a crash while it was written
        frame, dropped = frame.iloc[:-1], dropped + 1
    frame = frame.astype({"epoch": int}) if len(frame) else frame
    notes = []
    if dropped:
        notes.append(f"{dropped} unreadable or incomplete row(s) of {path.name} skipped")
    missing = [c for c in COLUMNS if c not in frame.columns and c not in TIMING_COLUMNS]
    if missing:
        notes.append(f"{path.name} has no {', '.join(missing)} column(s) (written by an older cnnexp?)")
    if not len(frame):
        return None, "; ".join(notes) or f"{path.name} has no complete rows"
    return frame, "; ".join(notes) or None
