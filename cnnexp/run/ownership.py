"""Who may write into a run directory: the rule for every way two commands
can meet in one directory.

- One process at a time writes into a run directory: a run (or resume, or
  sweep job) takes its lock for its lifetime; a second one is refused.
- A new plain run never starts where a run's results are (run.json,
  metrics.csv, a checkpoint): it is refused, naming trainer.resume to continue.
- A re-run sweep continues its own jobs and is refused, before anything is
  written, when a job directory holds a job with other overrides.

No torch here: a sweep's parent process claims its directory before any job
starts, and must not pay for importing it (run/warm_workers.py).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from cnnexp.errors import ConfigError
from cnnexp.results.files import CHECKPOINT_NAME, METRICS_FILE, RUN_RECORD
from cnnexp.results.record import read_record
from cnnexp.safeio import DirLock


class SweepDirTaken(ConfigError):
    """A re-run sweep whose job directory holds a different job."""


class RunDirTaken(ConfigError):
    """A run directory that holds another run's results, or that another process is writing into."""


RESULT_FILES = (RUN_RECORD, METRICS_FILE, CHECKPOINT_NAME)
_held: dict[str, DirLock] = {}


def claim_run_dir(run_dir: Path) -> None:
    """Hold the lock on run_dir until release_run_dir or the end of the process;
    RunDirTaken when another process holds it."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = DirLock(run_dir)
    if not lock.acquire():
        raise RunDirTaken(f"Another cnnexp process is writing into {run_dir}; wait for it to end, or write "
                          "elsewhere with hydra.run.dir=PATH (hydra.sweep.dir=PATH for -m).")
    _held[key] = lock


def release_run_dir(run_dir: Path) -> None:
    lock = _held.pop(str(Path(run_dir).resolve()), None)
    if lock is not None:
        lock.release()


def refuse_if_taken(run_dir: Path) -> None:
    """A fresh run must not write over the results of one that ran here before."""
    found = [name for name in RESULT_FILES if (Path(run_dir) / name).exists()]
    if not found:
        return
    status = (read_record(run_dir) or {}).get("status")
    held = f"a run ({status})" if status else f"a run's results ({', '.join(found)})"
    go_on = (f"continue it with {override_text('trainer.resume', run_dir)}, "
             if (Path(run_dir) / CHECKPOINT_NAME).is_file() and status != "completed" else "")
    raise RunDirTaken(f"{run_dir} already holds {held}; results are never overwritten: {go_on}choose another "
                      "hydra.run.dir (or leave it out for a new dated directory), or delete it first.")


def job_dir_conflict(run_dir: Path, overrides: list[str]) -> str | None:
    """Why a sweep job with `overrides` cannot use run_dir (another job's results are there), or None."""
    record = read_record(run_dir)
    if not record or record.get("overrides") is None or list(record["overrides"]) == list(overrides):
        return None
    return (f"{run_dir} holds a job run with overrides {record['overrides']}, not {overrides}; "
            "a resumed sweep must repeat the same sweep command, or use a new hydra.sweep.dir.")


def override_text(key: str, path) -> str:
    """`key=path` as one shell word that Hydra reads back as exactly `path`:
    a path with spaces, commas (a sweep to Hydra), quotes or $ is quoted for
    Hydra and then for the shell, so the printed hint can be pasted."""
    text = str(path)
    if re.fullmatch(r"[\w@%+:./-]+", text):
        return f"{key}={text}"
    word = f"{key}='" + text.replace("'", "\\'") + "'"
    return '"' + re.sub(r'(["$`\\])', r"\\\1", word) + '"'  # in double quotes only these are special


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"The output directory {run_dir} cannot be written ({err.strerror or err}); "
            "choose another with hydra.run.dir=PATH (or hydra.sweep.dir=PATH for -m)."
        ) from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"The output directory {run_dir} is not writable; choose another with hydra.run.dir=PATH.")
