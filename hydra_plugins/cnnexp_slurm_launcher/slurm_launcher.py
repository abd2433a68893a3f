"""Hydra's submitit SLURM launcher, with what a sweep needs on a real cluster.

Hydra's launcher submits one array task per sweep job. This one adds:

- requeue by itself: a job stopped by SIGTERM (pre-emption, `scancel
  --signal=TERM`) or warned of its time limit (SIGUSR2, `signal_delay_s`
  before it) finishes its training step, writes its checkpoint and asks SLURM
  to requeue it; a job SLURM requeues itself (`scontrol requeue`, pre-emption
  in REQUEUE mode) stops the same way. Started again, the job continues from
  its checkpoint (cnnexp.run.job resumes a sweep job from its directory);
- a job that dies without a result (killed, out of memory, node lost) is
  recorded as failed, and the other jobs' results are still collected, so
  the sweep ends with its summary and plots and exits 1 naming the job;
- job states from `squeue` where the cluster keeps no accounting (no `sacct`).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

log = logging.getLogger("cnnexp")

# A sweep job stopped by SIGTERM exits with this code after writing its checkpoint (cnnexp.run.job).
STOPPED_BY_SIGTERM = 128 + signal.SIGTERM


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """Hydra's submitit SLURM launcher with cnnexp's requeue and lost-job handling."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        # Runs in the job, on the node. The bound parent call is taken here: submitit
        # ships this class by value, so a module-level name for it may be another class object.
        parent_call = super().__call__
        return _with_requeue(lambda: parent_call(*args, **kwargs))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit one array task per job, then collect every job's result, also when some are lost."""
        assert self.config is not None
        executor = _executor(self)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        job_params = [(list(ov), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
                      for n, ov in zip(numbers, job_overrides)]
        jobs = executor.map_array(self, *zip(*job_params))
        log.info("Submitted %d SLURM job(s): %s; their logs: %s", len(jobs), " ".join(j.job_id for j in jobs),
                 sweep_dir / ".submitit")

        returns = []
        for n, overrides, job in zip(numbers, job_overrides, jobs):
            try:
                returns.append(job.results()[0])
            except Exception as err:  # the job ended without a result: killed, out of memory, node lost
                returns.append(_lost(sweep_dir / _subdir(overrides, n), list(overrides), job, err))
        return returns


def run_workers(launcher, workers: Sequence[Any], sweep_dir: Path) -> list:
    """Run each search worker (a callable) as one job of `launcher`'s kind: SLURM jobs
    under hydra/launcher=slurm or submitit_slurm, local submitit processes under
    submitit_local. Waits for all of them; a worker lost on its node is logged and
    its unfinished trial stays running in the study (re-running the command continues it)."""
    executor = _executor(launcher)
    jobs = executor.map_array(_WorkerJob(), list(workers))
    log.info("Submitted %d search worker job(s): %s; their logs: %s", len(jobs), " ".join(j.job_id for j in jobs),
             sweep_dir / ".submitit")
    done = []
    for k, job in enumerate(jobs):
        try:
            done.append(job.results()[0])
        except Exception as err:  # killed, out of memory, node lost
            log.error("Search worker %d (job %s) ended without a result (%s, state %s); see %s", k, job.job_id,
                      type(err).__name__, job.state, job.paths.stderr)
            done.append([])
    return done


class _WorkerJob:
    """A search worker on its node, stopped and requeued like any cnnexp SLURM job;
    when it starts again it first continues the trial it was running."""

    def __call__(self, worker) -> list[int]:
        return _with_requeue(worker)


def _executor(launcher):
    """A submitit executor with the launcher preset's parameters (SLURM or local)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import SlurmJob

    from cnnexp.sweep.slurm import accounting_works, queue_watcher

    # Hydra's plugin scan may load the submitit plugin's module twice, so an isinstance
    # check against its classes can fail; the executor kind each launcher class names cannot.
    cluster = "slurm" if getattr(launcher, "_EXECUTOR", "local") == "slurm" else "local"
    if cluster == "slurm" and not accounting_works():
        SlurmJob.watcher = queue_watcher()(delay_s=600)
    params = dict(launcher.params)
    timeouts = params.pop("max_num_timeout", None)
    executor = submitit.AutoExecutor(cluster=cluster, folder=params.pop("submitit_folder"),
                                     **({f"{cluster}_max_num_timeout": timeouts} if timeouts is not None else {}))
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"{cluster}_{k}": v for k, v in params.items()})
    return executor


def _with_requeue(run):
    """Run a job's work on its node. submitit answers SIGUSR2 by requeueing at once;
    during training cnnexp first finishes the step and writes a checkpoint, so
    there the warning goes to cnnexp's stop handler, and a job that stopped so is
    requeued."""
    submitit_handler = signal.getsignal(signal.SIGUSR2)
    idle_term_handler = signal.getsignal(signal.SIGTERM)

    def on_time_limit_warning(signum, frame):
        current = signal.getsignal(signal.SIGTERM)
        if callable(current) and current is not idle_term_handler:  # training: stop cleanly
            current(signal.SIGTERM, frame)
        else:
            submitit_handler(signum, frame)

    if callable(submitit_handler):
        signal.signal(signal.SIGUSR2, on_time_limit_warning)
    try:
        return run()
    except SystemExit as stop:
        if stop.code == STOPPED_BY_SIGTERM and callable(submitit_handler):
            _requeue(submitit_handler)
        raise


def _requeue(submitit_handler) -> None:
    from cnnexp.sweep.slurm import job_state

    raw_id = os.environ.get("SLURM_JOB_ID", "")
    array_id, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_id}_{task}" if array_id and task else raw_id
    state = job_state(raw_id) if raw_id else "UNKNOWN"
    if state != "RUNNING":  # SLURM is requeueing it already, or it was cancelled
        log.warning("SLURM job %s is %s; not asking for a requeue.", job_id, state)
        return
    log.warning("Requeueing SLURM job %s; it continues from its checkpoint when it starts again.", job_id)
    # submitit's own handler counts time-outs against max_num_timeout, runs
    # `scontrol requeue` and exits the job.
    submitit_handler(signal.SIGUSR2, None)


def _subdir(overrides: Sequence[str], number: int) -> str:
    """The job's directory under the sweep dir: its number, unless the sweeper named it."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+") == "hydra.sweep.subdir":
            return value
    return str(number)


def _lost(job_dir: Path, overrides: list[str], job, err: Exception) -> JobReturn:
    from cnnexp.sweep.slurm import record_lost_job

    message = (f"SLURM job {job.job_id} ended without a result ({type(err).__name__}, state {job.state}); "
               f"see {job.paths.stderr}")
    log.error("%s", message)
    record_lost_job(job_dir, overrides, message)
    # Returned as done so that the sweep goes on to its summary, which lists
    # this job as failed and makes the command exit 1.
    ret = JobReturn(overrides=overrides, working_dir=str(job_dir), status=JobStatus.COMPLETED)
    ret.return_value = None
    return ret
