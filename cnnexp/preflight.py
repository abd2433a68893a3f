"""Checks Hydra runs before it creates the run directory, so an output
location that cannot be written, a disk with no room for Hydra's own files,
or a SLURM cluster that is not there, is one clear line instead of a traceback.

They also claim the output directory before Hydra writes its config copies
into it (run/resume.py states the rule): a plain run takes its run dir's lock
and refuses a directory that holds another run's results; a sweep takes its
sweep dir's lock and refuses, writing nothing, a re-run whose jobs differ
from the ones already in it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnnexp.errors import CnnexpError, ConfigError, DiskFull
from cnnexp.run.ownership import (
    SweepDirTaken,
    check_writable,
    claim_run_dir,
    job_dir_conflict,
    refuse_if_taken,
)
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
        _stop_on_error(claim_run_dirs, config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_launcher(config.hydra.launcher)  # before the sweep dir exists
        _check(config.hydra.sweep.dir, "hydra.sweep.dir")
        _stop_on_error(claim_sweep_dir, config)


def _stop_on_error(check, config: DictConfig) -> None:
    try:
        check(config)
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


def claim_run_dirs(config: DictConfig) -> None:
    """A plain run's directory, and the run a trainer.resume continues: locked
    for this process; a fresh run's directory must hold no results."""
    from cnnexp.run.resume import (
        find_checkpoint,  # a plain run imports torch anyway; a sweep need not
    )

    run_dir = Path(config.hydra.run.dir)
    resumed = None
    if OmegaConf.select(config, "trainer.resume"):
        try:
            resumed = find_checkpoint(str(config.trainer.resume)).parent.parent
        except ConfigError:  # the job says what is wrong with it
            resumed = None
        if resumed is not None:
            claim_run_dir(resumed)
    if resumed is None or resumed.resolve() != run_dir.resolve():
        claim_run_dir(run_dir)
        refuse_if_taken(run_dir)


def claim_sweep_dir(config: DictConfig) -> None:
    """The sweep dir locked for this process; a re-run whose jobs are not the
    ones its job dirs hold is refused before Hydra writes anything."""
    claim_run_dir(Path(config.hydra.sweep.dir))
    for job_dir, overrides in basic_sweep_jobs(config):
        conflict = job_dir_conflict(job_dir, overrides)
        if conflict:
            raise SweepDirTaken(conflict)


def basic_sweep_jobs(config: DictConfig) -> list[tuple[Path, list[str]]]:
    """(job dir, overrides) of each job a basic-sweeper sweep will launch, as
    Hydra will compute them; [] for other sweepers or job dir patterns (each
    job then checks its own directory when it starts)."""
    hydra_cfg = config.hydra
    if not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return []
    if OmegaConf.to_container(hydra_cfg.sweep, resolve=False).get("subdir") != "${hydra.job.num}":
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = hydra_cfg.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(hydra_cfg.overrides.task)
    try:
        jobs = [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments),
                                                              None) for job in batch]
    except Exception:  # noqa: BLE001 - an unusual sweep (a glob over configs): the jobs check themselves
        return []
    return [(Path(hydra_cfg.sweep.dir) / str(num), list(job)) for num, job in enumerate(jobs)]


def _check_launcher(launcher: DictConfig) -> None:
    from cnnexp.sweep.slurm import check_cluster, is_slurm_launcher

    if not is_slurm_launcher(launcher):
        return
    try:
        check_cluster(launcher)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
