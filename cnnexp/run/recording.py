"""Observers that keep run.json current while a run trains, for people and sweep summaries."""

from __future__ import annotations

from cnnexp.observers import RunObserver
from cnnexp.results.objective import record_fields
from cnnexp.results.record import RunRecord


class EpochCounter(RunObserver):
    """Keeps run.json's epochs_completed current."""

    def __init__(self, record: RunRecord):
        self.record = record

    def on_epoch(self, row: dict) -> None:
        self.record.epoch_done(row["epoch"])


class SelectionRecord(RunObserver):
    """Keeps run.json's objective and selected epoch current after every epoch,
    so a run stopped early (pruned, interrupted) still says what it reached."""

    def __init__(self, record: RunRecord, name: str):
        self.record, self.name, self.rows = record, name, []

    def on_start(self, cfg, run_dir, rows) -> None:
        self.rows = list(rows)
        if self.rows:
            self.record.update(**record_fields(self.name, self.rows))

    def on_epoch(self, row: dict) -> None:
        self.rows.append(row)
        self.record.update(**record_fields(self.name, self.rows))
