"""How many CPU cores this job may use: the cores it is allowed to run on,
shared evenly with the other jobs a parallel launcher runs beside it."""

from __future__ import annotations

import os
from pathlib import Path


def available_cores() -> int:
    """Cores this process may run on (its affinity set: a cluster job or
    `taskset` may allow fewer than the machine has). A SLURM job owns its
    cpus_per_task CPUs also where the cluster does not bind it to them."""
    if hasattr(os, "sched_getaffinity"):
        cores = max(1, len(os.sched_getaffinity(0)))
    else:
        cores = os.cpu_count() or 1
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(allocated)) if allocated.isdigit() and int(allocated) > 0 else cores


def cpu_budget() -> int:
    """Cores this job may use: all of them, or its share under a parallel launcher."""
    return max(1, available_cores() // parallel_jobs())


def parallel_jobs() -> int:
    """How many jobs of this sweep run at once on this machine (1 outside a
    parallel launcher). n_jobs follows joblib: -1 is every core, -2 all but
    one, and so on; a sweep with fewer jobs than n_jobs runs only those."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        n_jobs = hydra_cfg.launcher.get("n_jobs", 1)
    except Exception:  # not under Hydra (tests, library use) or a launcher without n_jobs
        return 1
    n_jobs = int(n_jobs) if n_jobs is not None else 1
    if n_jobs < 0:
        n_jobs = available_cores() + 1 + n_jobs
    sweep = sweep_size(hydra_cfg)
    if sweep is not None:
        n_jobs = min(n_jobs, sweep)
    return max(1, n_jobs)


def sweep_size(hydra_cfg) -> int | None:
    """Number of jobs in a basic-sweeper sweep, from the multirun.yaml Hydra
    writes into the sweep directory before launching; None when unknown."""
    try:
        if not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        saved = OmegaConf.load(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
        arguments = list(saved.hydra.overrides.task)
        params = saved.hydra.sweeper.get("params") or {}
        arguments += [f"{key}={value}" for key, value in params.items()]
        size = 1
        for override in OverridesParser.create().parse_overrides(arguments):
            if override.is_sweep_override():
                size *= len(list(override.sweep_string_iterator()))
        batch = hydra_cfg.sweeper.get("max_batch_size")
        return min(size, int(batch)) if batch else size
    except Exception:  # an unreadable or unusual sweep: do not cap
        return None
