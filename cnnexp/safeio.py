"""Writing files so that a failure never leaves half a file or a stray temp file.

Every file cnnexp rewrites (checkpoint, run.json, metrics.csv on a resume,
summary.csv, weights, figures, the image cache) is written to a temp file
beside it and renamed over it: a kill or a full disk leaves the previous
version intact, and the temp file is removed whatever went wrong. Rows
appended to metrics.csv are cut back if the append fails half-way.

A full disk (or quota) becomes DiskFull: one line naming the file and the
filesystem, instead of the OSError, or the RuntimeError torch.save wraps it in.
A directory that cannot be written (read-only, permissions) becomes
NotWritable, naming the directory.

Two more rules about files live here: `load_tensors` reads a .pt file without
running code it may carry (torch's weights-only unpickler), and `DirLock`
lets one process at a time write into a directory.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pickle
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from cnnexp.errors import DiskFull, NotWritable, UntrustedFile

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# A directory that cannot be written: read-only filesystem or mount, permissions.
UNWRITABLE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


def is_disk_full(err: BaseException | None) -> bool:
    """True if err, or an error it was raised from or while handling, is ENOSPC/EDQUOT."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


def unwritable_path(err: BaseException | None) -> str | None:
    """The file a write failed on when err (or its cause) is EROFS/EACCES/EPERM, else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in UNWRITABLE_ERRNOS:
            return str(err.filename) if err.filename else ""
        err = err.__cause__ or err.__context__
    return None


def not_writable_error(directory: Path, err: BaseException) -> NotWritable:
    reason = next((e.strerror for e in _chain(err) if isinstance(e, OSError) and e.strerror), str(err))
    return NotWritable(f"The output directory {directory} cannot be written ({reason}); choose another with "
                       "hydra.run.dir=PATH (hydra.sweep.dir=PATH for -m), or make it writable again.")


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


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
    tmp = unique_temp_name(path)
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


def unique_temp_name(path: Path) -> Path:
    """A temp name beside `path` no other process uses, also on another machine
    sharing the filesystem (a pid alone repeats across nodes)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


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
        err = sys.exc_info()[1]
        if is_disk_full(err) or unwritable_path(err) is not None:
            self.disabled_by_full_disk = True
            why = "the disk is full" if is_disk_full(err) else "its directory cannot be written"
            print(f"warning: {why}; {self.baseFilename} is no longer written "
                  "(messages still go to the terminal).", file=sys.stderr)
            return
        super().handleError(record)


# ---------------------------------------------------------------- reading .pt files
# numpy arrays in checkpoints written before RNG states were stored as tensors
# (the legacy numpy generator state holds a uint32 array). These rebuild plain
# arrays only; torch documents allow-listing them for weights-only loading.
def _numpy_array_globals() -> list:
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def load_tensors(path: Path, map_location="cpu"):
    """torch.load that never runs code from the file: tensors, containers and
    plain values only (plus numpy arrays). A file that needs more is refused
    with UntrustedFile, naming what it would have imported."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    with safe_globals(_numpy_array_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" not in str(err):
                raise
            try:
                needed = [g for g in get_unsafe_globals_in_checkpoint(path) if not g.startswith("numpy.")]
            except Exception:  # noqa: BLE001 - only for the message
                needed = []
    what = f" (it imports {', '.join(needed[:3])})" if needed else ""
    raise UntrustedFile(f"{path} holds Python objects beyond tensors and plain values{what}; unpickling it could "
                        "run any code it carries, so it is not loaded. Use only files written by cnnexp, "
                        "from a source you trust.")


# ---------------------------------------------------------------- one writer per directory
class DirLock:
    """An exclusive lock on a directory, held until release() or the process ends.

    flock on the directory itself leaves nothing behind; where the filesystem
    cannot lock a directory (NFS emulates flock with write locks, which need a
    file open for writing) a hidden lock file inside it is locked instead. The
    kernel drops the lock when the process dies, so a killed run never leaves
    a stale lock."""

    LOCK_FILE = ".cnnexp.lock"

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock, False when another does."""
        if self.fd is not None:
            return True
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # a directory this filesystem cannot lock: lock a file in it
            os.close(fd)
            fd = os.open(self.directory / self.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            with suppress(OSError):
                os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
