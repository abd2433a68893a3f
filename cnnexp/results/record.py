"""run.json: what a run is and how it ended, for people, sweep summaries and resumes."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from cnnexp.errors import DiskFull
from cnnexp.results.files import RUN_RECORD
from cnnexp.safeio import overwrite_in_place, write_text


def now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def versions() -> dict:
    import hydra
    import torch
    import torchvision

    from cnnexp.version import __version__

    return {
        "cnnexp": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "hydra": hydra.__version__,
        "python": platform.python_version(),
    }


def read_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None


class RunRecord:
    """run.json of one run. A resumed run keeps its first start, its original
    overrides and command, and gains an entry in `resumes` per continuation;
    `wall_seconds` adds up the time of every segment."""

    def __init__(self, run_dir: Path, **fields):
        self.path = Path(run_dir) / RUN_RECORD
        self.data = {"status": "running", "started_at": now_iso(), "ended_at": None, "pid": os.getpid(), **fields}
        self.segment_start = time.perf_counter()
        self.earlier_seconds = 0.0  # wall time of the segments before this one

    def wall_seconds(self) -> float:
        return round(self.earlier_seconds + time.perf_counter() - self.segment_start, 1)

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def epoch_done(self, epoch: int) -> None:
        # wall time so far, so a segment that is killed still counts up to its last epoch
        self.update(epochs_completed=epoch, wall_seconds=self.wall_seconds())

    def finish(self, status: str, **fields) -> bool:
        """Record how the run ended. Never raises: on a full disk it writes over
        run.json in place; False if even that failed."""
        self.data.update(status=status, ended_at=now_iso(), wall_seconds=self.wall_seconds(), **fields)
        try:
            self.write()
            return True
        except (OSError, DiskFull):
            try:
                overwrite_in_place(self.path, self.text())
                return True
            except OSError:
                return False

    def text(self) -> str:
        return json.dumps(self.data, indent=2, default=str) + "\n"

    def write(self) -> None:
        write_text(self.path, self.text())
