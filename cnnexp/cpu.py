"""The machine as a run sees it: which one it is, how many of its cores this job
may use, how many threads each phase gets, and where per-machine results
(step choices, compiled kernels) are cached.

The core budget is the cores this process may run on, shared evenly with the
other jobs a parallel launcher runs beside it. Every caller asks here, so a
sweep's launcher and its jobs agree under taskset or SLURM.
"""

from __future__ import annotations

import contextlib
import os
import platform
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
    n_jobs = parallel_jobs_of(n_jobs)
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

        saved = OmegaConf.load(Path(hydra_cfg.sweep.dir) / "multirun.yaml")  # written by Hydra
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


def parallel_jobs_of(n_jobs) -> int:
    """A launcher's n_jobs as a count of jobs, counting back from the cores this
    job may use for negative values (joblib's -1: every core)."""
    n = int(n_jobs) if n_jobs is not None else 1
    if n < 0:
        n = available_cores() + 1 + n
    return max(1, n)


def thread_plan(num_threads: int | None, batch_size: int) -> tuple[int, int]:
    """(training, evaluation) CPU threads before any timing. Small-batch steps
    are overhead-bound and run fastest on one thread; evaluation at a large
    batch uses this job's share of the cores. A timed step plan (autotune.py)
    may replace the training count."""
    if num_threads:
        return num_threads, num_threads
    return (1 if batch_size <= 64 else cpu_budget()), cpu_budget()


@contextlib.contextmanager
def cpu_settings(threads: int | None, onednn: bool | None = None):
    """Temporarily set torch's CPU thread count and oneDNN use."""
    import torch  # here: the rest of this module serves processes that never load torch (cnnexp.plot)

    old_threads, old_onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    if threads:
        torch.set_num_threads(threads)
    if onednn is not None:
        torch.backends.mkldnn.enabled = onednn
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.mkldnn.enabled = old_onednn


# ----------------------------------------------------------------- identity and cache
def cache_dir() -> Path:
    """$CNNEXP_CACHE_DIR, else $XDG_CACHE_HOME/cnnexp, else ~/.cache/cnnexp.

    Only a path: nothing is created here. Every cache is a shortcut, so each
    writer treats a directory it cannot create or write as "no cache" (one
    warning, the work done again), never as a failed run."""
    if os.environ.get("CNNEXP_CACHE_DIR"):
        return Path(os.environ["CNNEXP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no $HOME and no home in the password database (some batch jobs)
            import tempfile

            base = Path(tempfile.gettempdir()) / f"cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return Path(base).expanduser() / "cnnexp"


def _cpuinfo_line(*prefixes: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (what a step choice is cached under)."""
    line = _cpuinfo_line("model name")
    return line.split(":", 1)[1].strip() if line else platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's feature flags line (what a compiled kernel is built for)."""
    return _cpuinfo_line("flags", "Features") or platform.processor() or platform.machine()
