"""Parallel sweep workers started while the command is still composing.

Hydra's joblib launcher hands its jobs to joblib's reusable process pool only
after the sweep's config is composed and its callbacks are set up, and each
new worker then pays Python's start-up and the import of torch (about 2 s on
a 2-core machine) before its first job can begin. When the command line asks
for a joblib sweep, cnnexp starts that same pool at once, from a background
thread, with the arguments the launcher will pass, and has each worker
import what a job needs; the launcher's own call finds the pool with equal
arguments and reuses it, warm. A config that changes the launcher's
arguments after all (a preset setting hydra.launcher.*) makes joblib start a
new pool: the warm-up was wasted work, never a wrong result.

The parent offers the same pool its own heavy work (cnnexp/warm_pool.py):
checking every job's `_target_` before the first job, and the summary and
comparison plots after the last, so it never imports torch, matplotlib or
pandas itself. Unless the command line says trainer.plots=none, each worker
also imports what drawing a job's figures needs, before its first job.
"""

from __future__ import annotations

import threading

from cnnexp import warm_pool
from cnnexp.config.keys import brings_unseen_config

# The launcher keys (hydra.launcher.KEY) a warm-up can match from the command
# line; any other launcher key leaves the pool to the launcher.
MATCHED_KEYS = ("n_jobs",)
# Hydra's flags that print and exit without launching anything.
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


def joblib_jobs(arguments: list[str]) -> int | None:
    """The n_jobs of the joblib sweep these command-line arguments ask for
    (joblib's -1 when not given), or None when they do not ask for one that a
    warm-up can match for sure."""
    if not any(a in ("-m", "--multirun") for a in arguments) or any(a in INFO_FLAGS for a in arguments):
        return None
    overrides = [a.lstrip("+~") for a in arguments if "=" in a and not a.startswith("-")]
    if "hydra/launcher=joblib" not in overrides or brings_unseen_config(overrides):
        return None  # not a joblib sweep, or a preset may set the launcher's arguments
    n_jobs = -1
    for override in overrides:
        key, _, value = override.partition("=")
        if key.startswith("hydra.launcher."):
            if key.removeprefix("hydra.launcher.") not in MATCHED_KEYS:
                return None
            try:
                n_jobs = int(value)
            except ValueError:
                return None  # Hydra will name the bad value
    return n_jobs


def launcher_arguments(n_jobs: int) -> dict:
    """joblib.Parallel's arguments as Hydra's joblib launcher builds them for n_jobs."""
    import dataclasses

    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf

    arguments = {f.name: f.default for f in dataclasses.fields(JobLibLauncherConf) if f.name != "_target_"}
    arguments.update(n_jobs=n_jobs, backend="loky")
    process_joblib_cfg(arguments)
    return arguments


def import_job_modules() -> int:
    """Run in each worker: import what every job needs; returns the worker's pid."""
    import os

    import torch  # noqa: F401 - the second it takes is the point

    import cnnexp.run.job  # noqa: F401

    return os.getpid()


def import_figure_modules() -> None:
    """Run in each worker after import_job_modules: what drawing a job's figures and
    the sweep's summary needs. Apart, so that the parent's checks, which need torch
    only, can run in a worker in between."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import pandas  # noqa: F401


def draws_figures(arguments: list[str]) -> bool:
    return not any(a.lstrip("+~") == "trainer.plots=none" for a in arguments)


def start(arguments: list[str]) -> threading.Thread | None:
    """Start warming the workers of the joblib sweep the command line asks for;
    the thread ends when every worker has imported torch and cnnexp."""
    n_jobs = joblib_jobs(arguments)
    if n_jobs is None:
        return None
    try:
        parallel_arguments = launcher_arguments(n_jobs)
    except Exception:  # noqa: BLE001 - no joblib launcher here: Hydra will say so
        return None
    warm_pool.offer(parallel_arguments)  # the parent's checks and summary run in these workers
    thread = threading.Thread(target=warm, args=(parallel_arguments, draws_figures(arguments)),
                              name="cnnexp-warm-workers", daemon=True)
    thread.start()
    return thread


def warm(arguments: dict, figures: bool = True) -> list[int]:
    """The pids of the workers of the pool these joblib.Parallel arguments
    start, warmed ([] when the pool cannot be started here)."""
    try:
        from joblib import Parallel, delayed, effective_n_jobs

        workers = effective_n_jobs(arguments["n_jobs"])
        pids = Parallel(**arguments)(delayed(import_job_modules)() for _ in range(workers))
        if figures:
            Parallel(**arguments)(delayed(import_figure_modules)() for _ in range(workers))
        return pids
    except Exception:  # noqa: BLE001 - the launcher starts its own workers as it always did
        warm_pool.withdraw()
        return []
