"""Where a search's study lives: the storage URL, opening it, and what to do
when its database is locked.

    hydra.sweeper.storage        the study is in
    null (the default)           <sweep dir>/optuna.db (SQLite) on one machine;
                                 <sweep dir>/optuna.journal under the SLURM launcher
    journal                      <sweep dir>/optuna.journal, Optuna's journal file
    journal:PATH                 a journal file elsewhere (on a filesystem every node sees)
    sqlite:///PATH, postgresql://..., mysql://...   a database (Optuna's RDB storage)

A journal file takes many writers on a shared filesystem (each append holds
a lock file next to it); SQLite suits one machine and a few writers; a
database server suits many nodes. A database that stays locked is retried
with backoff for a bounded time and then named in one line; a password in a
URL is never printed or written into the sweep directory.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.results.files import STUDY_DB, STUDY_JOURNAL

log = logging.getLogger("cnnexp")

JOURNAL = "journal"
SEARCH_EXTRA = "pip install 'cnnexp[search]'"
# How long a locked database is retried before the operation gives up, and the
# busy timeout SQLite itself waits on each attempt.
LOCK_WAIT_S = 120.0
SQLITE_BUSY_TIMEOUT_S = 5


class StudyLocked(CnnexpError):
    """The study's database stayed locked (or unreachable) longer than LOCK_WAIT_S."""


class StudyUnavailable(ConfigError):
    """The study cannot be read: its file is missing or damaged, or its database refuses."""


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"A search needs the optuna package, which is not installed: {SEARCH_EXTRA}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # cnnexp logs what matters itself
    return optuna


# ------------------------------------------------------------------ URLs
def resolve(setting: str | None, sweep_dir: Path, cluster: bool = False) -> str:
    """The storage URL a search uses for hydra.sweeper.storage=`setting`."""
    sweep_dir = Path(sweep_dir).resolve()
    if not setting:
        setting = JOURNAL if cluster else f"sqlite:///{sweep_dir / STUDY_DB}"
    if setting == JOURNAL:
        return f"{JOURNAL}:{sweep_dir / STUDY_JOURNAL}"
    if setting.startswith(f"{JOURNAL}:"):
        path = Path(setting[len(JOURNAL) + 1:].removeprefix("//")).expanduser()
        return f"{JOURNAL}:{path if path.is_absolute() else (sweep_dir / path)}"
    return with_driver(setting)


def with_driver(url: str) -> str:
    """postgresql:// names no driver, and SQLAlchemy 2.1 then wants psycopg 3; where only
    psycopg2 is installed (psycopg2-binary), the URL names it."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def local_file(url: str) -> Path | None:
    """The file a journal or SQLite URL names (None for a database server)."""
    if url.startswith(f"{JOURNAL}:"):
        return Path(url[len(JOURNAL) + 1:])
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^@/\s]+@")


def masked(text: str) -> str:
    """`text` with the password of any URL in it replaced by ***."""
    return _PASSWORD.sub(r"\1***@", str(text))


def dashboard_argument(url: str) -> str:
    """What optuna-dashboard takes for this storage: a journal file's path, else the URL."""
    path = local_file(url)
    return str(path) if url.startswith(f"{JOURNAL}:") and path is not None else masked(url)


# ------------------------------------------------------------------ opening
def open_storage(url: str, create: bool = True):
    """The study storage for `url`. With create=False a missing study file is
    StudyUnavailable rather than a new empty one (python -m cnnexp.plot reads,
    never creates)."""
    optuna = require_optuna()
    url = with_driver(url)
    path = local_file(url)
    if not create and path is not None and not path.is_file():
        raise StudyUnavailable(f"the study file {path} does not exist")
    if url.startswith(f"{JOURNAL}:"):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        # The open lock (O_EXCL) is the one Optuna documents for NFS v3 and later.
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path), grace_period=60))
        return optuna.storages.JournalStorage(backend)
    engine = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite:") else {}
    storage = _retrying(url, lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine,
                                                                 skip_table_creation=not create))
    return RetryingStorage(storage, url)


class RetryingStorage:
    """An RDB storage whose every call is retried while the database is locked or
    briefly unreachable (another process holding a write lock, a server restart).

    Each storage call is one transaction, rolled back when it fails, so a retry
    never applies a change twice. Optuna accepts any object with the storage
    methods here (it only wraps an RDBStorage it is given in a cache)."""

    def __init__(self, storage, url: str):
        self._inner, self._url = storage, url

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            return _retrying(self._url, lambda: attr(*args, **kwargs))

        return call


def trial_id(storage, study_name: str, number: int) -> int:
    """A trial's storage id from its number, through the storage's public lookup
    (Optuna's trial objects keep their id private)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def _retrying(url: str, operation):
    delay, deadline = 0.05, time.monotonic() + LOCK_WAIT_S
    waited = False
    while True:
        try:
            return operation()
        except Exception as err:
            reason = _transient(err)
            if reason is None:
                raise
            if time.monotonic() + delay > deadline:
                raise StudyLocked(
                    f"The study's database {masked(url)} stayed unusable for {LOCK_WAIT_S:.0f} s ({reason}): "
                    "another process holds a write lock on it, or its server does not answer. Stop that process "
                    "(or wait for it) and run the same command again; for many parallel trials use "
                    "hydra.sweeper.storage=journal or a database server.") from None
            if not waited:
                log.info("The study's database %s is busy (%s); retrying for up to %.0f s", masked(url), reason,
                         LOCK_WAIT_S)
                waited = True
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# A lock held by another writer, or a connection the server dropped: worth a retry.
# ("unable to open database file" or "connection refused" are not: those are
# reported at once.)
_TRANSIENT = re.compile(r"locked|busy|deadlock|could not serialize|server closed the connection|"
                        r"terminating connection|connection reset", re.IGNORECASE)


def _transient(err: BaseException) -> str | None:
    """The database's own words when `err` is a lock or a lost connection, else None."""
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:
        return None
    seen, depth = err, 0
    while seen is not None and depth < 10:
        if isinstance(seen, OperationalError):
            words = str(getattr(seen, "orig", seen) or seen).strip().splitlines()
            first = words[0] if words else ""
            return masked(first) if _TRANSIENT.search(first) else None
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    return None
