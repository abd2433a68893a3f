"""Shared helpers: compose the real config, run the real CLI in a subprocess."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cnnexp.cli import config_dir

# Small synthetic data keeps a CLI run to a few seconds.
SMALL = ["data=synthetic", "data.n_train=400", "data.n_test=200", "trainer.progress=log"]


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Step-plan timings and compiled kernels of test runs stay out of the user's cache."""
    path = tmp_path_factory.mktemp("cnnexp-cache")
    previous = os.environ.get("CNNEXP_CACHE_DIR")
    os.environ["CNNEXP_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("CNNEXP_CACHE_DIR", None)
    else:
        os.environ["CNNEXP_CACHE_DIR"] = previous


@pytest.fixture
def compose_cfg():
    def _compose(overrides=()):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


def run_cli(args, cwd: Path, module: str = "cnnexp", timeout: float = 300, env: dict | None = None, **kw):
    """Run `python -m cnnexp ARGS` in cwd and return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kw)


def start_cli(args, cwd: Path, env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    """`python -m cnnexp ARGS` started in cwd; new_session: in its own process group, as a
    terminal's foreground command is, so that os.killpg reaches it and its workers."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "cnnexp", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=new_session)


def wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the metrics CSV at path holds n rows (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().count("\n") >= n + 1:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {n} rows")


class StderrLines:
    """Collects a running process's stderr line by line, so a test can act when
    a line appears (e.g. a progress line inside an epoch) and read the rest later."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stderr.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return
            assert self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.01)
        raise AssertionError(f"{text!r} never appeared on stderr")

    def finish(self, timeout: float = 120) -> str:
        """Wait for the process to end; its whole stderr."""
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return "".join(self.lines)


def write_module(directory: Path, name: str, source: str) -> None:
    """A Python module a CLI run started in `directory` can name in a _target_."""
    (directory / f"{name}.py").write_text(source)


def rows_without_timing(path: Path) -> list[dict]:
    """metrics.csv's rows as strings, without the timing columns (which differ between equal runs)."""
    from cnnexp.results.metrics import TIMING_COLUMNS

    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture
def log_handlers():
    """A resumed run adds a handler for its cnnexp.log; the test removes what it added."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def compiled_library():
    """Build the compiled step once for the whole session (the first build takes seconds)."""
    from cnnexp.engine.kernels.build import BuildError, compiler, load

    if compiler() is None:
        pytest.skip("no C++ compiler on this machine: the compiled step falls back to eager")
    try:
        return load()
    except BuildError as err:
        pytest.skip(f"the compiled step does not build here: {err}")
