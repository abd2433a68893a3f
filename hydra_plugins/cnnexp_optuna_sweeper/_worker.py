"""A search worker: Optuna's distributed pattern, one trial after another.

Every worker opens the shared study, asks it for the next trial as soon as it
is free, runs that trial as an ordinary cnnexp job in `<sweep dir>/<trial
number>/`, tells the study how it ended (from the job's run.json), and asks
again until the study holds n_trials trials. A pruned trial frees its worker
at once, so no slot waits for a slower neighbour. The sweeper runs one
worker in its own process, n_jobs worker processes on this machine, or
n_jobs SLURM jobs (_search.py decides); a worker is the same code in each.

"Count the trials, then ask" happens under a lock file in the sweep dir, so
workers on any number of nodes (sharing the sweep dir, as they must) never
run more than n_trials. A worker that was stopped (Ctrl-C, SLURM requeue)
first continues the trials it had started, from their checkpoints: each
trial records its worker's number.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnexp.errors import ConfigError
from cnnexp.results import objective as objectives
from cnnexp.results.files import ASK_LOCK, METRICS_FILE
from cnnexp.results.record import read_record
from cnnexp.sweep.pruning import TRIAL_ENV, TrialLink
from cnnexp.sweep.storage import masked, open_storage, require_optuna, trial_id

from ._space import SearchSpace

log = logging.getLogger("cnnexp")

WORKER_ATTR = "cnnexp.worker"  # trial user attribute: the number of the worker running it
ACTIVE = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")  # trials that count towards n_trials (not WAITING)


@dataclass(frozen=True)
class Ticket:
    """One trial for a worker to run: its number, storage id and job overrides."""

    number: int
    trial_id: int
    overrides: list[str]


@dataclass(frozen=True)
class Ending:
    """How a trial's job ended, as the runner saw it: `value` its return, `error` when it raised."""

    value: Any = None
    error: str | None = None


@dataclass
class StudySpec:
    """What a worker needs, picklable to another process or a SLURM job."""

    storage_url: str
    study_name: str
    sweep_dir: str
    objective: str
    space: SearchSpace
    limit: int  # trials the study holds when the workers stop (n_trials, or the grid's size)
    sampler: dict = field(default_factory=dict)  # the sweeper's settings: sampler, seed, sampler_options
    workers: int = 1

    def job_dir(self, number: int) -> Path:
        return Path(self.sweep_dir) / str(number)


class Worker:
    """Runs trials of one study until it holds `spec.limit` of them."""

    def __init__(self, spec: StudySpec, index: int, runner: Callable[[Ticket, TrialLink], Ending]):
        self.spec, self.index, self.runner = spec, index, runner

    def __call__(self) -> list[int]:
        """Run trials; the numbers of those this worker ran."""
        study = self.open_study()
        ran = []
        for ticket in self.own_unfinished(study):
            log.info("Continuing trial %d, which was stopped before it finished", ticket.number)
            ran.append(self.run(study, ticket))
        while (ticket := self.next_trial(study)) is not None:
            ran.append(self.run(study, ticket))
        return ran

    # ------------------------------------------------------------ the study
    def open_study(self):
        optuna = require_optuna()
        existing = len(optuna.load_study(study_name=self.spec.study_name,
                                         storage=open_storage(self.spec.storage_url)).get_trials(deepcopy=False))
        sampler = build_sampler(self.spec.sampler, self.spec.space, seed_offset=existing + 7919 * self.index,
                                parallel=self.spec.workers > 1)
        return optuna.load_study(study_name=self.spec.study_name, storage=open_storage(self.spec.storage_url),
                                 sampler=sampler)

    def own_unfinished(self, study) -> list[Ticket]:
        """Trials this worker started and did not finish (it was stopped)."""
        running = require_optuna().trial.TrialState.RUNNING
        return [self.ticket(study, t.number, t.user_attrs["overrides"])
                for t in study.get_trials(deepcopy=False, states=(running,))
                if t.user_attrs.get("sweep_dir") == self.spec.sweep_dir and t.user_attrs.get(WORKER_ATTR) == self.index
                and "overrides" in t.user_attrs]

    def next_trial(self, study) -> Ticket | None:
        """Ask the study for a new trial, or None when it holds enough."""
        optuna = require_optuna()
        states = tuple(getattr(optuna.trial.TrialState, s) for s in ACTIVE)
        with ask_lock(Path(self.spec.sweep_dir)):
            if len(study.get_trials(deepcopy=False, states=states)) >= self.spec.limit:
                return None
            trial = study.ask()
            params = {key: _suggest(trial, key, dist) for key, dist in self.spec.space.distributions.items()}
            overrides = self.spec.space.overrides(params)
            record = read_record(self.spec.job_dir(trial.number))
            if record is not None and record.get("overrides") != overrides:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise ConfigError(
                    f"{self.spec.job_dir(trial.number)} holds another job ({' '.join(record.get('overrides') or [])})"
                    f", not trial {trial.number} of study {study.study_name!r}: this sweep dir belongs to another "
                    "study. Use a new hydra.sweep.dir, or the storage and study_name that made it.")
            trial.set_user_attr("overrides", overrides)
            trial.set_user_attr("sweep_dir", self.spec.sweep_dir)
            trial.set_user_attr(WORKER_ATTR, self.index)
        return self.ticket(study, trial.number, overrides)

    def ticket(self, study, number: int, overrides: list[str]) -> Ticket:
        return Ticket(number, trial_id(open_storage(self.spec.storage_url), study.study_name, number), list(overrides))

    # ------------------------------------------------------------ one trial
    def run(self, study, ticket: Ticket) -> int:
        link = TrialLink(storage=self.spec.storage_url, study=self.spec.study_name, trial_id=ticket.trial_id,
                         number=ticket.number)
        ending = self.runner(ticket, link)
        settle(study, self.spec, ticket.number, ending)
        return ticket.number


def settle(study, spec: StudySpec, number: int, ending: Ending | None = None) -> bool:
    """Tell the study how trial `number` ended, from its job's run.json (and the
    runner's view); False when the job has not ended (its trial stays running)."""
    states = require_optuna().trial.TrialState
    job_dir = spec.job_dir(number)
    record = read_record(job_dir) or {}
    status = record.get("status")
    if ending is not None and ending.error is not None and status not in ("completed", "pruned"):
        log.warning("Trial %d failed: %s", number, ending.error)
        study.tell(number, state=states.FAIL, skip_if_finished=True)
        return True
    if status == "pruned":
        study.tell(number, state=states.PRUNED, skip_if_finished=True)
        log.info("Trial %d pruned after %s epoch(s)", number, record.get("epochs_completed"))
        return True
    if status == "completed":
        value = ending.value if ending is not None else None
        if value is None:
            value = record.get("objective_value")
        if value is None:  # a record without the objective: compute it from the job's metrics
            value = _objective_from_metrics(spec.objective, job_dir / METRICS_FILE)
        value = math.nan if value is None else float(value)
        if math.isnan(value):
            log.warning("Trial %d completed without a value for %s; counted as failed", number, spec.objective)
            study.tell(number, state=states.FAIL, skip_if_finished=True)
        else:
            study.tell(number, value, skip_if_finished=True)
            log.info("Trial %d completed: %s %.4g", number, spec.objective, value)
        return True
    if status == "failed" or ending is not None:
        why = (record.get("error") or "").split("\n")[0] or f"it left no usable record (see {job_dir / 'cnnexp.log'})"
        log.warning("Trial %d failed: %s", number, why)
        study.tell(number, state=states.FAIL, skip_if_finished=True)
        return True
    return False


class ask_lock:  # noqa: N801 - used as a `with` statement
    """A lock file in the sweep dir, held while a worker counts the trials and asks
    for the next one. Optuna's journal open lock (O_EXCL, safe on NFS v3 and later)."""

    def __init__(self, sweep_dir: Path):
        from optuna.storages.journal import JournalFileOpenLock

        # A lock left by a killed worker is taken over after the grace period.
        self.lock = JournalFileOpenLock(str(sweep_dir / ASK_LOCK), grace_period=60)

    def __enter__(self):
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        try:
            self.lock.release()
        except RuntimeError:  # taken over after the grace period: nothing left to release
            pass


def _objective_from_metrics(name: str, path: Path) -> float:
    import csv

    try:
        with open(path, newline="") as f:
            return objectives.final_value(name, list(csv.DictReader(f)))
    except OSError:
        return math.nan


def _suggest(trial, key: str, dist):
    """A value for `key` through the public suggest API (an enqueued trial gets its fixed value)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)


SAMPLERS = ("tpe", "random", "cmaes", "grid")


def build_sampler(settings: dict, space: SearchSpace, seed_offset: int = 0, parallel: bool = False):
    """The Optuna sampler the settings name. A continued study or another worker
    gets another seed (seed + offset): new draws, still reproducible. Parallel TPE
    workers treat running trials as already bad (constant liar), so that they do
    not all ask for the same region."""
    optuna = require_optuna()
    options = dict(settings.get("sampler_options") or {})
    if settings.get("seed") is not None:
        options.setdefault("seed", int(settings["seed"]) + seed_offset)
    name = settings["sampler"]
    if name == "tpe" and parallel:
        options.setdefault("constant_liar", True)
    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
             "cmaes": optuna.samplers.CmaEsSampler, "grid": optuna.samplers.GridSampler}
    try:
        if name == "grid":
            return kinds["grid"](space.grid(), **options)
        return kinds[name](**options)
    except ImportError as err:
        raise ConfigError(f"hydra.sweeper.sampler={name} needs a package that is not installed "
                          f"({err.name or err}): pip install 'cnnexp[search]'") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"hydra.sweeper.sampler_options={settings.get('sampler_options')} do not fit the {name} "
                          f"sampler: {err}") from None


# ------------------------------------------------------------ running a trial as a Hydra job
class HydraTrialRunner:
    """Runs a trial as Hydra runs a sweep job (the basic launcher's steps), in this
    process; picklable, so it also works in a worker process or a SLURM job."""

    def __init__(self, hydra_context, task_function, config, singleton_state: dict, parallel_jobs: int | None):
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        self.singleton_state, self.parallel_jobs = singleton_state, parallel_jobs
        self.ready_in = None  # the process id where Hydra's globals were set up

    def __call__(self, ticket: Ticket, link: TrialLink) -> Ending:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobStatus, configure_log, run_job, setup_globals
        from omegaconf import open_dict, read_write

        if self.ready_in != os.getpid():  # a fresh process: Hydra's globals as the launcher had them
            # The task function's module registers the config's resolvers when imported.
            importlib.import_module(self.task_function.__module__)
            setup_globals()
            Singleton.set_state(self.singleton_state)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            self.ready_in = os.getpid()
        overrides = [*ticket.overrides, f"hydra.sweep.subdir={ticket.number}"]
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{ticket.number}"
            sweep_config.hydra.job.num = ticket.number
        if self.parallel_jobs:  # the jobs beside it, so that it takes its share of the cores
            with read_write(sweep_config.hydra.launcher), open_dict(sweep_config.hydra.launcher):
                sweep_config.hydra.launcher.n_jobs = self.parallel_jobs
        HydraConfig.instance().set_config(sweep_config)
        # The link is this process's environment while the job runs, not a Hydra setting:
        # the job's saved hydra.yaml must not carry the storage URL (it may hold a password).
        os.environ[TRIAL_ENV] = link.to_env()
        try:
            ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        finally:
            os.environ.pop(TRIAL_ENV, None)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if ret.status == JobStatus.COMPLETED:
            return Ending(value=ret.return_value)
        try:  # a failed job's return_value re-raises what the task function raised
            ret.return_value  # noqa: B018
        except Exception as err:
            return Ending(error=masked(f"{type(err).__name__}: {err}".splitlines()[0]))
        return Ending(error="the job failed")
