"""Checks Hydra runs before it creates the run directory, so an output
location that cannot be written, or a SLURM cluster that is not there, is one
clear line instead of a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cnnexp.errors import ConfigError
from cnnexp.validate import check_writable


def _check(path: str) -> None:
    try:
        check_writable(Path(path))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


class OutputDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from cnnexp.slurm import is_slurm_launcher

        if is_slurm_launcher(config.hydra.launcher):  # Hydra uses launchers for -m only
            print("warning: hydra/launcher=slurm applies to sweeps only; this run trains here. "
                  "Add -m to submit it to SLURM as a one-job sweep.", file=sys.stderr)
        _check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_launcher(config.hydra.launcher)  # before the sweep dir exists
        _check(config.hydra.sweep.dir)


def _check_launcher(launcher: DictConfig) -> None:
    from cnnexp.slurm import check_cluster, is_slurm_launcher

    if not is_slurm_launcher(launcher):
        return
    try:
        check_cluster(launcher)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
