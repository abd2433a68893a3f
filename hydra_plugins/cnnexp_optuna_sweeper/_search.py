"""The search: check everything, open the study, then let n_jobs workers take
trials from it until it holds n_trials (Optuna's distributed pattern, _worker.py).

Each trial is an ordinary cnnexp job in `<sweep dir>/<trial number>/`, so the
job directories of a continued study never collide with earlier ones, and a
trial's own run.json says how it ended (completed, pruned, failed). Where the
workers run follows hydra/launcher: in this process (one worker), in worker
processes on this machine (basic or joblib with n_jobs > 1), or as n_jobs
SLURM jobs (hydra/launcher=slurm, or Hydra's submitit launchers).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnexp.cpu import parallel_jobs_of
from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.results import objective as objectives
from cnnexp.sweep import search as results
from cnnexp.sweep import storage as stores
from cnnexp.sweep.pruning import PRUNER_ATTR, PRUNERS, build_pruner
from cnnexp.sweep.storage import masked, require_optuna
from cnnexp.sweep.table import failed_jobs_line

from ._space import (
    SearchSpace,
    SearchSpaceError,
    contains,
    describe,
    differences,
    params_from_config,
    parse,
)
from ._worker import (
    SAMPLERS,
    WORKER_ATTR,
    HydraTrialRunner,
    StudySpec,
    Worker,
    build_sampler,
    settle,
)

log = logging.getLogger("cnnexp")
OBJECTIVE_ATTR = "cnnexp.objective"


@dataclass
class Search:
    sweeper: Any
    study: Any
    spec: StudySpec
    n_jobs: int

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
        enqueued = [_enqueued_params(entry, space) for entry in s["enqueue"] or []]

        limit = int(s["n_trials"])
        if s["sampler"] == "grid":
            try:
                grid = space.grid()
            except SearchSpaceError as err:
                raise ConfigError(str(err)) from None
            limit = min(limit, math.prod(len(v) for v in grid.values()))
        max_epochs = int(config.trainer.max_epochs)
        pruner_spec = {"name": s["pruner"], "min_epochs": s["pruner_min_epochs"],
                       "startup_trials": s["pruner_startup_trials"], "max_epochs": max_epochs,
                       "options": s["pruner_options"] or {}}
        try:
            pruner = build_pruner(pruner_spec)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"hydra.sweeper.pruner_options={s['pruner_options']} do not fit the "
                              f"{s['pruner']} pruner: {err}") from None
        n_jobs = s["n_jobs"] or _launcher_jobs(config)
        sampler = build_sampler(s, space, parallel=n_jobs > 1)

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        storage_url = stores.resolve(s["storage"], sweep_dir, cluster=_is_cluster(sweeper.launcher))
        study_file = stores.local_file(storage_url)
        if study_file is not None and study_file.parent != sweep_dir and not study_file.parent.is_dir():
            raise ConfigError(f"hydra.sweeper.storage={masked(storage_url)!r} cannot be opened: the folder "
                              f"{study_file.parent} does not exist.")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = _open_study(optuna, storage_url, s["study_name"], sampler, pruner, objectives.direction(name))
        _check_same_question(study, space, name, bool(s.get("extend")), storage_url)
        study.set_user_attr(PRUNER_ATTR, pruner_spec)  # the jobs build their pruner from this
        study.set_user_attr(OBJECTIVE_ATTR, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental in some Optuna versions
            study.set_metric_names([name])  # optuna-dashboard labels the objective with it
        for params in enqueued:
            study.enqueue_trial(params, skip_if_exists=True)
        results.write_marker(sweep_dir, storage_url, study_name=s["study_name"], objective=name,
                             direction=objectives.direction(name), sampler=s["sampler"], pruner=s["pruner"],
                             max_epochs=max_epochs, n_jobs=n_jobs, params=dict(space.sources))
        if not name.startswith(("best_val", "final_val")):
            log.warning("The search's objective %s is not measured on a validation split, so the search tunes on "
                        "what it reports; hold out images with data.val_size for an honest search.", name)
        spec = StudySpec(storage_url=storage_url, study_name=s["study_name"], sweep_dir=str(sweep_dir),
                         objective=name, space=space, limit=limit,
                         sampler={k: s[k] for k in ("sampler", "seed", "sampler_options")}, workers=n_jobs)
        return cls(sweeper, study, spec, n_jobs)

    # ------------------------------------------------------------ the workers
    def run(self) -> list[int]:
        states = require_optuna().trial.TrialState
        self._adopt_unfinished()
        trials = self.study.get_trials(deepcopy=False)
        active = [t for t in trials if t.state != states.WAITING]
        to_go = max(0, self.spec.limit - len(active))
        log.info("Search: study %r in %s, %s (%s), sampler %s; %d trial(s) already in the study, %d to run%s",
                 self.study.study_name, masked(self.spec.storage_url), self.spec.objective,
                 objectives.direction(self.spec.objective), self.spec.sampler["sampler"], len(active), to_go,
                 f", {self.n_jobs} workers taking trials as they free up" if self.n_jobs > 1 else "")
        if not to_go and not any(t.state == states.RUNNING for t in trials):
            log.info("The study already holds %d trials (hydra.sweeper.n_trials=%d); raise n_trials to "
                     "search further.", len(active), self.spec.limit)
        ran = self._launch_workers()
        for t in self.study.get_trials(deepcopy=False, states=(states.RUNNING,)):  # a worker that was lost
            if t.user_attrs.get("sweep_dir") == self.spec.sweep_dir:
                settle(self.study, self.spec, t.number)
        self._finish()
        return ran

    def _adopt_unfinished(self) -> None:
        """Trials a previous run of this command left running (it was stopped): the
        ones whose job ended are told now; the others go to the workers, spread
        over them, to continue from their checkpoints."""
        optuna = require_optuna()
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        mine = [t for t in running if t.user_attrs.get("sweep_dir") == self.spec.sweep_dir]
        k = 0
        for t in mine:
            if settle(self.study, self.spec, t.number):
                continue
            if t.user_attrs.get(WORKER_ATTR, 0) >= self.n_jobs or t.user_attrs.get(WORKER_ATTR) is None:
                # Through the public Trial API: the trial stays RUNNING, only its worker changes.
                number_id = stores.trial_id(stores.open_storage(self.spec.storage_url), self.study.study_name,
                                            t.number)
                optuna.trial.Trial(self.study, number_id).set_user_attr(WORKER_ATTR, k % self.n_jobs)
                k += 1

    def _launch_workers(self) -> list[int]:
        from hydra.core.singleton import Singleton

        launcher = self.sweeper.launcher
        local_parallel = self.n_jobs > 1 and not _is_submitit(launcher)
        # Local jobs share this machine's cores among the workers; a SLURM job has its own.
        runner = HydraTrialRunner(self.sweeper.hydra_context, self.sweeper.task_function, self.sweeper.config,
                                  Singleton.get_state(), parallel_jobs=None if _is_submitit(launcher) else self.n_jobs)
        workers = [Worker(self.spec, k, runner) for k in range(self.n_jobs)]
        if _is_submitit(launcher):
            from hydra_plugins.cnnexp_slurm_launcher.slurm_launcher import run_workers

            return [n for ran in run_workers(launcher, workers, Path(self.spec.sweep_dir)) for n in ran]
        if not local_parallel:
            return workers[0]()
        return _in_processes(workers)

    def _finish(self) -> None:
        """summary.csv, best.txt and the figures; the best trial and its command line;
        exit 1 naming the trials that did not complete (failed, or left running)."""
        sweep_dir = Path(self.spec.sweep_dir)
        try:
            plots = OmegaConf.select(self.sweeper.config, "trainer.plots", default="all") != "none"
            table = results.write_search_summary(sweep_dir, plots=plots)
        except (OSError, CnnexpError) as err:
            words = getattr(err, "strerror", None) or str(err)
            print(f"cnnexp: error: the search summary could not be written into {sweep_dir} ({words}); the trials' "
                  f"run directories are kept: redraw it with python -m cnnexp.plot {sweep_dir}", file=sys.stderr)
            raise SystemExit(1) from None
        log.info("%s(also in %s)", (sweep_dir / results.BEST_FILE).read_text(), sweep_dir / results.BEST_FILE)
        line = failed_jobs_line(table)
        if line:
            print(f"cnnexp: error: {line}", file=sys.stderr)
            raise SystemExit(1)


# ------------------------------------------------------------ helpers
def _in_processes(workers: list[Worker]) -> list[int]:
    """Each worker in a process of its own (loky, as Hydra's joblib launcher uses).

    Ctrl-C reaches every process of the terminal: the workers' jobs checkpoint
    and stop, and this process waits for them instead of tearing them down."""
    from joblib import Parallel, delayed

    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        done = Parallel(n_jobs=len(workers), backend="loky")(delayed(w)() for w in workers)
    finally:
        signal.signal(signal.SIGINT, previous)
    return [n for ran in done for n in ran]


# Hydra's plugin scan may load the submitit plugin's module twice, so isinstance checks
# against its classes can fail; the executor kind each submitit launcher class names cannot.
def _is_submitit(launcher) -> bool:
    return getattr(launcher, "_EXECUTOR", None) in ("slurm", "local")


def _is_cluster(launcher) -> bool:
    """Trials on other nodes: the default store is then the journal file."""
    return getattr(launcher, "_EXECUTOR", None) == "slurm"


def _open_study(optuna, url: str, name: str, sampler, pruner, direction: str):
    try:
        storage = stores.open_storage(url)
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                    direction=direction, load_if_exists=True)
    except stores.StudyLocked:
        raise
    except Exception as err:  # a bad URL, a missing driver, a server that does not answer
        words = str(getattr(err, "orig", None) or err).strip().splitlines()
        first = masked(words[0]) if words else type(err).__name__
        raise ConfigError(f"hydra.sweeper.storage={masked(url)!r} cannot be opened: {first}") from None
    if study.direction.name.lower() != direction:
        raise ConfigError(f"Study {name!r} in {masked(url)} was made to {study.direction.name.lower()} "
                          f"{study.user_attrs.get(OBJECTIVE_ATTR, 'its objective')}, but this trainer.objective "
                          f"asks to {direction}: use another hydra.sweeper.study_name or hydra.sweep.dir.")
    return study


def _check_same_question(study, space: SearchSpace, objective: str, extend: bool, url: str) -> None:
    """A study continued with another objective or search space would mix answers
    to two questions: refuse, unless hydra.sweeper.extend=true (space only)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() or t.params]
    if not trials:
        return
    start_new = ("start a new study with another hydra.sweep.dir (or hydra.sweeper.study_name)")
    before = study.user_attrs.get(OBJECTIVE_ATTR)
    if before and before != objective:
        raise ConfigError(f"Study {study.study_name!r} in {masked(url)} searched for the best {before}, but "
                          f"trainer.objective is now {objective}: its trials cannot be compared; {start_new}.")
    searched: dict[str, Any] = {}
    for t in trials:
        searched.update(t.distributions)
    changed = differences(searched, space.distributions)
    if changed and not extend:
        raise ConfigError(f"Study {study.study_name!r} in {masked(url)} searched another space: "
                          f"{'; '.join(changed)}. To continue it with the new space anyway, add "
                          f"hydra.sweeper.extend=true; or {start_new}.")


def _enqueued_params(entry: Any, space: SearchSpace) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"hydra.sweeper.enqueue entries are maps of searched keys to values, not {entry!r}.")
    unknown = [k for k in entry if k not in space.distributions]
    if unknown:
        raise ConfigError(f"hydra.sweeper.enqueue names {unknown[0]}, which is not searched "
                          f"(searched: {', '.join(space.distributions)}).")
    for key, value in entry.items():
        if not contains(space.distributions[key], value):
            raise ConfigError(f"hydra.sweeper.enqueue gives {key}={value!r}, outside its search space "
                              f"{describe(space.distributions[key])}: enqueue a value inside it, or widen the "
                              "space.")
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
