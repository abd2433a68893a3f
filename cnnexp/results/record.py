"""run.json: what a run is and how it ended, for people, sweep summaries and resumes.

Besides the results, run.json holds what it takes to run it again
(`reproduction`): the exact command line, the git commit and dirty state of
the working directory's repository and of any repository a `_target_` module
is loaded from, the machine (host, CPU, GPU) and the package versions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cnnexp.cpu import cpu_model
from cnnexp.errors import DiskFull
from cnnexp.results.files import RUN_RECORD
from cnnexp.safeio import overwrite_in_place, write_text


def now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def versions() -> dict:
    """The versions of the packages every run uses. torchvision's comes from its
    metadata: importing it only to ask would cost seconds at every start."""
    import hydra
    import torch

    from cnnexp.version import __version__

    return {
        "cnnexp": __version__,
        "torch": torch.__version__,
        "torchvision": _installed_version("torchvision"),
        "hydra": hydra.__version__,
        "python": platform.python_version(),
    }


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# Packages whose version can change a result or a file format, recorded when installed.
OPTIONAL_PACKAGES = ("numpy", "omegaconf", "optuna", "mlflow", "tensorboard", "timm", "onnx")
GIT_TIMEOUT_S = 5  # a huge or network-mounted repository must not hold up the run


def package_versions() -> dict:
    """versions(), plus the optional packages that are installed (read from their metadata, not imported)."""
    found = versions()
    for name in OPTIONAL_PACKAGES:
        version = _installed_version(name)
        if version is not None:
            found[name] = version
    return found


def git_state(path: Path) -> dict | None:
    """The repository holding `path`: its root, commit and whether tracked files differ
    from it (dirty); None outside a repository or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                              timeout=GIT_TIMEOUT_S).stdout.strip()
    try:
        root = git("rev-parse", "--show-toplevel")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"root": root, "commit": commit, "dirty": dirty}


def target_modules(config: dict, prefix: str = "") -> dict[str, str]:
    """`key._target_` -> the module its `_target_` names, for every `_target_` in a plain config."""
    found = {}
    if isinstance(config, dict):
        target = config.get("_target_")
        if isinstance(target, str) and "." in target:
            found[f"{prefix}._target_" if prefix else "_target_"] = target.rsplit(".", 1)[0]
        for key, value in config.items():
            found.update(target_modules(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin not in (None, "built-in", "frozen") else None


def reproduction(config: dict, device: str = "cpu") -> dict:
    """What a reproduction needs, for run.json: the exact command line, the
    repositories' commits, the machine and the package versions. `config` is
    the run's config as a plain dict (for the `_target_` modules' repositories)."""
    git = {"working_dir": git_state(Path.cwd())}
    seen = {git["working_dir"]["root"]} if git["working_dir"] else set()
    for key, module in {"cnnexp": "cnnexp", **target_modules(config)}.items():
        path = module_file(module)
        if path is None or not {"site-packages", "dist-packages"}.isdisjoint(path.parts):
            continue  # an installed package: its version says what it is
        state = git_state(path.parent)
        if state is not None and state["root"] not in seen:  # a repository of its own (a custom model's)
            seen.add(state["root"])
            git[key] = {"module": module, **state}
    gpu = None
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "command_line": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "cwd": str(Path.cwd()),
        "git": git,
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "gpu": gpu,
        "packages": package_versions(),
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
