"""run.json: what a run is and how it ended, for people, sweep summaries and resumes."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RUN_RECORD = "run.json"


def now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def versions() -> dict:
    import hydra
    import torch
    import torchvision

    import cnnexp

    return {
        "cnnexp": cnnexp.__version__,
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
    def __init__(self, run_dir: Path, **fields):
        self.path = Path(run_dir) / RUN_RECORD
        self.data = {"status": "running", "started_at": now_iso(), "ended_at": None, **fields}

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def finish(self, status: str, **fields) -> None:
        self.update(status=status, ended_at=now_iso(), **fields)

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)
