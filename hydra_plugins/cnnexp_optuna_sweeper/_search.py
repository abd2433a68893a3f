"""The search loop: check everything, then ask n_jobs trials, launch them as
one batch through the configured launcher, tell the study how each ended.

Each trial is an ordinary cnnexp job in `<sweep dir>/<trial number>/`, so the
job directories of a continued study never collide with earlier ones, and a
trial's own run.json says how it ended (completed, pruned, failed). The job
learns which trial it is from one environment variable (cnnexp/sweep/pruning.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf

from cnnexp.cpu import parallel_jobs_of
from cnnexp.errors import ConfigError
from cnnexp.results import objective as objectives
from cnnexp.results.files import METRICS_FILE
from cnnexp.results.record import read_record
from cnnexp.sweep import search as results
from cnnexp.sweep.pruning import (
    PRUNER_ATTR,
    PRUNERS,
    TRIAL_ENV,
    TrialLink,
    build_pruner,
    open_storage,
    require_optuna,
)

from ._space import SearchSpace, SearchSpaceError, format_value, params_from_config, parse

log = logging.getLogger("cnnexp")
SAMPLERS = ("tpe", "random", "cmaes", "grid")


@dataclass
class Search:
    sweeper: Any
    study: Any
    space: SearchSpace
    sweep_dir: Path
    storage_url: str
    objective: str
    n_trials: int
    n_jobs: int
    grid_size: int | None

    # ------------------------------------------------------------ checks
    @classmethod
    def prepare(cls, settings: dict, config: DictConfig, arguments: list[str], sweeper) -> Search:
        """Everything a search needs, checked before any job starts; ConfigError names what is wrong."""
        optuna = require_optuna()
        s = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in settings.items()}
        if s["sampler"] not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.sampler={s['sampler']!r} is not a sampler: use one of "
                              f"{', '.join(SAMPLERS)}.")
        if s["pruner"] not in PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner={s['pruner']!r} is not a pruner: use one of {', '.join(PRUNERS)}.")
        for key in ("n_trials", "pruner_min_epochs"):
            if s[key] < 1:
                raise ConfigError(f"hydra.sweeper.{key}={s[key]} must be at least 1.")
        if s["n_jobs"] is not None and s["n_jobs"] < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs={s['n_jobs']} must be at least 1 (or null: the launcher's).")

        name = objectives.from_config(config)  # ConfigError for a bad trainer.objective
        try:
            space = parse(params_from_config(s["params"]) + arguments, config)
        except SearchSpaceError as err:
            raise ConfigError(f"search space: {err}") from None
        if not space.distributions:
            raise ConfigError("Nothing to search: give at least one key a range of values, e.g. "
                              "'optim.lr=tag(log, interval(1e-4, 1e-1))' or 'data.batch_size=choice(4, 16, 64)' "
                              "(on the command line or under hydra.sweeper.params).")
        _check_composes(sweeper, space)

        grid_size = None
        if s["sampler"] == "grid":
            try:
                grid = space.grid()
            except SearchSpaceError as err:
                raise ConfigError(str(err)) from None
            grid_size = math.prod(len(v) for v in grid.values())
        sampler = _sampler(optuna, s, space)
        max_epochs = int(config.trainer.max_epochs)
        pruner_spec = {"name": s["pruner"], "min_epochs": s["pruner_min_epochs"],
                       "startup_trials": s["pruner_startup_trials"], "max_epochs": max_epochs,
                       "options": s["pruner_options"] or {}}
        try:
            pruner = build_pruner(pruner_spec)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"hydra.sweeper.pruner_options={s['pruner_options']} do not fit the "
                              f"{s['pruner']} pruner: {err}") from None

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage_url = s["storage"] or results.default_storage(sweep_dir)
        study = _open_study(optuna, storage_url, s["study_name"], sampler, pruner, objectives.direction(name))
        existing = len(study.get_trials(deepcopy=False))
        if existing and s["seed"] is not None:  # a continued study: new draws, still reproducible
            study.sampler = _sampler(optuna, s, space, seed_offset=existing)
        study.set_user_attr(PRUNER_ATTR, pruner_spec)  # the jobs build their pruner from this
        study.set_user_attr("cnnexp.objective", name)
        for entry in s["enqueue"] or []:
            study.enqueue_trial(_enqueued_params(entry, space), skip_if_exists=True)
        results.write_marker(sweep_dir, storage=s["storage"], study_name=s["study_name"], objective=name,
                             direction=objectives.direction(name), sampler=s["sampler"], pruner=s["pruner"],
                             max_epochs=max_epochs,
                             params=dict(space.sources))
        n_jobs = s["n_jobs"] or _launcher_jobs(config)
        return cls(sweeper, study, space, sweep_dir, storage_url, name, int(s["n_trials"]), n_jobs, grid_size)

    # ------------------------------------------------------------ the loop
    def run(self) -> list:
        optuna = require_optuna()
        states = optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()]
        # Trials a previous run of this command left running (it was stopped): finish them first.
        resumable = [t for t in trials if t.state == states.RUNNING
                     and t.user_attrs.get("sweep_dir") == str(self.sweep_dir)]
        to_go = max(0, self.n_trials - len(finished))
        if self.grid_size is not None:
            to_go = min(to_go, max(0, self.grid_size - len(finished)))
        log.info("Search: study %r in %s, %s (%s), sampler %s; %d trial(s) already finished, %d to run%s",
                 self.study.study_name, self.storage_url, self.objective, objectives.direction(self.objective),
                 type(self.study.sampler).__name__, len(finished), to_go,
                 f", {self.n_jobs} at a time" if self.n_jobs > 1 else "")
        if not to_go:
            log.info("The study already holds %d finished trials (hydra.sweeper.n_trials=%d); raise n_trials to "
                     "search further.", len(finished), self.n_trials)
        returns = []
        while to_go > 0:
            batch = []
            while resumable and len(batch) < min(self.n_jobs, to_go):
                trial = resumable.pop(0)
                if self._settle_from_record(trial.number):
                    to_go -= 1
                    continue
                batch.append((trial.number, trial._trial_id, trial.user_attrs["overrides"]))
                log.info("Continuing trial %d, which was stopped before it finished", trial.number)
            while len(batch) < min(self.n_jobs, to_go):
                batch.append(self._ask())
            if not batch:
                continue
            returns.append(self._launch(batch))
            to_go -= len(batch)
            self._write_summary()
        self._report_best()
        return returns

    def _ask(self) -> tuple[int, int, list[str]]:
        trial = self.study.ask()
        params = {key: _suggest(trial, key, dist) for key, dist in self.space.distributions.items()}
        overrides = self.space.overrides(params)
        job_dir = self.sweep_dir / str(trial.number)
        record = read_record(job_dir)
        if record is not None and record.get("overrides") != overrides:
            self.study.tell(trial, state=require_optuna().trial.TrialState.FAIL)
            raise SystemExit(_error(
                f"{job_dir} holds another job ({' '.join(record.get('overrides') or [])}), not trial "
                f"{trial.number} of study {self.study.study_name!r}: this sweep dir belongs to another study. "
                "Use a new hydra.sweep.dir, or the storage and study_name that made it."))
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("sweep_dir", str(self.sweep_dir))
        return trial.number, trial._trial_id, overrides

    def _launch(self, batch: list[tuple[int, int, list[str]]]) -> list:
        jobs = []
        for number, trial_id, overrides in batch:
            # The trial's own directory (a continued study never reuses one) and its link to
            # the study, both as Hydra settings: the job's own config stays the user's.
            link = TrialLink(storage=self.storage_url, study=self.study.study_name, trial_id=trial_id, number=number)
            jobs.append([*overrides, f"hydra.sweep.subdir={number}",
                         f"++hydra.job.env_set.{TRIAL_ENV}={format_value(link.to_env())}"])
        self.sweeper.validate_batch_is_legal(jobs)
        rets = self.sweeper.launcher.launch(jobs, initial_job_idx=batch[0][0])
        for (number, _, _), ret in zip(batch, rets):
            self._tell(number, ret)
        return list(rets)

    def _tell(self, number: int, ret) -> None:
        """Record how trial `number` ended, from the job's return and its run.json."""
        states = require_optuna().trial.TrialState
        if ret.status != JobStatus.COMPLETED:  # the task function raised: a bug, in the job's log
            log.warning("Trial %d failed: %s", number, ret._return_value)
            self.study.tell(number, state=states.FAIL, skip_if_finished=True)
            return
        if self._settle_from_record(number, value=ret.return_value):
            return
        log.warning("Trial %d left no usable record; counted as failed (see %s)", number,
                    self.sweep_dir / str(number) / "cnnexp.log")
        self.study.tell(number, state=states.FAIL, skip_if_finished=True)

    def _settle_from_record(self, number: int, value: Any = None) -> bool:
        """Tell the study what the job dir's run.json says; False when the job has not ended."""
        states = require_optuna().trial.TrialState
        record = read_record(self.sweep_dir / str(number)) or {}
        status = record.get("status")
        if status == "pruned":
            self.study.tell(number, state=states.PRUNED, skip_if_finished=True)
            log.info("Trial %d pruned after %s epoch(s)", number, record.get("epochs_completed"))
            return True
        if status == "completed":
            if value is None:
                value = record.get("objective_value")
            if value is None:  # a record without the objective: compute it from the job's metrics
                value = _objective_from_metrics(self.objective, self.sweep_dir / str(number) / METRICS_FILE)
            value = math.nan if value is None else float(value)
            if math.isnan(value):
                log.warning("Trial %d completed without a value for %s; counted as failed", number, self.objective)
                self.study.tell(number, state=states.FAIL, skip_if_finished=True)
            else:
                self.study.tell(number, value, skip_if_finished=True)
                log.info("Trial %d completed: %s %.4g", number, self.objective, value)
            return True
        if status == "failed":
            log.warning("Trial %d failed: %s", number, (record.get("error") or "").split("\n")[0])
            self.study.tell(number, state=states.FAIL, skip_if_finished=True)
            return True
        return False

    def _write_summary(self) -> None:
        from cnnexp.sweep.summary import write_summary

        try:
            write_summary(self.sweep_dir)
        except Exception as err:  # the summary must never stop the search
            log.warning("Could not update the search summary: %s", err)

    def _report_best(self) -> None:
        """The totals, the best trial and its command line (also in best.txt)."""
        try:
            results.write_search_summary(self.sweep_dir)
            log.info("%s(also in %s)", (self.sweep_dir / results.BEST_FILE).read_text(),
                     self.sweep_dir / results.BEST_FILE)
        except Exception as err:
            log.warning("Could not summarise the search: %s", err)


# ------------------------------------------------------------ helpers
def _error(message: str) -> int:
    import sys

    print(f"cnnexp: error: {message}", file=sys.stderr)
    return 2


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


def _sampler(optuna, s: dict, space: SearchSpace, seed_offset: int = 0):
    options = dict(s["sampler_options"] or {})
    if s["seed"] is not None:
        options.setdefault("seed", int(s["seed"]) + seed_offset)
    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
             "cmaes": optuna.samplers.CmaEsSampler, "grid": optuna.samplers.GridSampler}
    try:
        if s["sampler"] == "grid":
            return kinds["grid"](space.grid(), **options)
        return kinds[s["sampler"]](**options)
    except ImportError as err:
        raise ConfigError(f"hydra.sweeper.sampler={s['sampler']} needs a package that is not installed "
                          f"({err.name or err}): pip install 'cnnexp[search]'") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"hydra.sweeper.sampler_options={s['sampler_options']} do not fit the {s['sampler']} "
                          f"sampler: {err}") from None


def _open_study(optuna, url: str, name: str, sampler, pruner, direction: str):
    try:
        storage = open_storage(url)
    except Exception as err:  # a bad URL, a missing driver, a server that does not answer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"hydra.sweeper.storage={url!r} cannot be opened: {first}") from None
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"Study {name!r} in {url} was made to {study.direction.name.lower()} "
                          f"{study.user_attrs.get('cnnexp.objective', 'its objective')}, but this trainer.objective "
                          f"asks to {direction}: use another hydra.sweeper.study_name or hydra.sweep.dir.")
    return study


def _enqueued_params(entry: Any, space: SearchSpace) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"hydra.sweeper.enqueue entries are maps of searched keys to values, not {entry!r}.")
    unknown = [k for k in entry if k not in space.distributions]
    if unknown:
        raise ConfigError(f"hydra.sweeper.enqueue names {unknown[0]}, which is not searched "
                          f"(searched: {', '.join(space.distributions)}).")
    return dict(entry)


def _launcher_jobs(config: DictConfig) -> int:
    """Trials in flight: the launcher's n_jobs (joblib; negative counts back from the cores), else 1."""
    return parallel_jobs_of(OmegaConf.select(config, "hydra.launcher.n_jobs", default=None))


def _check_composes(sweeper, space: SearchSpace) -> None:
    """Compose one trial's config here, so a misspelt key fails before any job starts."""
    sample = {}
    for key, dist in space.distributions.items():
        choices = getattr(dist, "choices", None)
        sample[key] = choices[0] if choices else dist.low
    try:
        sweeper.validate_batch_is_legal([space.overrides(sample)])
    except Exception as err:
        text = str(err).strip().replace("\n", " ")
        raise ConfigError(f"search space: {text}") from None
