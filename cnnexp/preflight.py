"""Checks Hydra runs before it creates the run directory, so an output
location that cannot be written, a disk with no room for Hydra's own files,
or a SLURM cluster that is not there, is one clear line instead of a traceback."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cnnexp.config.checks import check_writable
from cnnexp.errors import CnnexpError, ConfigError, DiskFull
from cnnexp.safeio import mount_point

# Hydra writes its config copies (.hydra/, about 20 kB) before cnnexp can
# report anything; below this much free space it would fail with a traceback.
MIN_FREE_BYTES = 64 * 1024


def _check(path: str, key: str) -> None:
    try:
        if not str(path).strip():
            raise ConfigError(f"{key} is empty; give the directory to write into, e.g. {key}=outputs/my_run.")
        check_writable(Path(path))
        free = shutil.disk_usage(path).free
        if free < MIN_FREE_BYTES:
            raise DiskFull(f"The disk is full: the filesystem at {mount_point(Path(path))} holding {path} has only "
                           f"{free // 1024} kB free. Free some space, or write elsewhere with hydra.run.dir=PATH "
                           "(hydra.sweep.dir=PATH for -m).")
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


class OutputDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from cnnexp.sweep.slurm import is_slurm_launcher

        if is_slurm_launcher(config.hydra.launcher):  # Hydra uses launchers for -m only
            print("warning: hydra/launcher=slurm applies to sweeps only; this run trains here. "
                  "Add -m to submit it to SLURM as a one-job sweep.", file=sys.stderr)
        _check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_launcher(config.hydra.launcher)  # before the sweep dir exists
        _check(config.hydra.sweep.dir, "hydra.sweep.dir")


def _check_launcher(launcher: DictConfig) -> None:
    from cnnexp.sweep.slurm import check_cluster, is_slurm_launcher

    if not is_slurm_launcher(launcher):
        return
    try:
        check_cluster(launcher)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
