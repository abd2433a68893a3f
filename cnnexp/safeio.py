"""Writing files so that a failure never leaves half a file or a stray temp file.

Every file cnnexp rewrites (checkpoint, run.json, metrics.csv on a resume,
summary.csv, weights, figures, the image cache) is written to a temp file
beside it and renamed over it: a kill or a full disk leaves the previous
version intact, and the temp file is removed whatever went wrong. Rows
appended to metrics.csv are cut back if the append fails half-way.

A full disk (or quota) becomes DiskFull: one line naming the file and the
filesystem, instead of the OSError, or the RuntimeError torch.save wraps it in.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from cnnexp.errors import DiskFull

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(err: BaseException | None) -> bool:
    """True if err, or an error it was raised from or while handling, is ENOSPC/EDQUOT."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


def mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_full_error(path: Path) -> DiskFull:
    path = Path(path)
    where = mount_point(path.parent)
    try:
        size = f" ({_human(shutil.disk_usage(where).total)} in all)"
    except OSError:
        size = ""
    return DiskFull(f"The disk is full: {path} could not be written; the filesystem at {where}{size} "
                    "has no space left.")


def _human(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def atomic_path(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; it replaces `path` when the block
    ends without error, and is removed otherwise. durable=True also syncs the
    file and the rename to disk (for checkpoints: a crash keeps one whole copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            _sync_dir(path.parent)
    except BaseException as err:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(err, Exception) and not isinstance(err, DiskFull) and is_disk_full(err):
            raise disk_full_error(path) from None
        raise


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through atomic_path (weights, checkpoints)."""
    import torch  # only writers of tensors pay for it

    with atomic_path(path, durable=True) as tmp:
        # Through a Python file, so a full disk surfaces as an OSError (ENOSPC).
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def write_text(path: Path, text: str, durable: bool = False) -> None:
    with atomic_path(path, durable) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)


@contextmanager
def appending(path: Path) -> Iterator:
    """Open `path` to append; if writing fails, cut the file back to what it held,
    so a half-written row never follows the whole ones."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        with suppress(OSError):
            os.truncate(path, size)  # frees blocks, needs none
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full_error(path) from None
        raise


def overwrite_in_place(path: Path, text: str) -> None:
    """Last resort when there is no room for a temp file: write over the file's
    own blocks (no new space needed while the text is not longer than them)."""
    data = text.encode()
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate(len(data))
        f.flush()
        os.fsync(f.fileno())


class LogFileHandler(logging.FileHandler):
    """The run's cnnexp.log. When the disk fills up it says so once on the
    terminal and stops writing, instead of printing a traceback per message."""

    disabled_by_full_disk = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.disabled_by_full_disk:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if is_disk_full(sys.exc_info()[1]):
            self.disabled_by_full_disk = True
            print(f"warning: the disk is full; {self.baseFilename} is no longer written "
                  "(messages still go to the terminal).", file=sys.stderr)
            return
        super().handleError(record)
