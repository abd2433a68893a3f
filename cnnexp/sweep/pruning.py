"""A search trial's side of pruning: report the objective after each epoch,
stop when the study's pruner says so.

The Optuna sweeper (hydra_plugins/cnnexp_optuna_sweeper) runs each trial as
an ordinary cnnexp job, in a search worker's process (this machine's or a
SLURM job's). The worker tells the job which trial it is through one
environment variable, set while that job runs, so a normal run never sees
any of this and a trial's config is exactly the config a user would re-run.
Reports go through the study's storage (sweep/storage.py: SQLite or a
journal file in the sweep dir, or a database server), which is what lets a
trial on another process or node be pruned.
The last epoch is never pruned: a trial that ran it is complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from cnnexp.observers import RunObserver, StopRun
from cnnexp.results import objective
from cnnexp.sweep.storage import open_storage, require_optuna

log = logging.getLogger("cnnexp")

TRIAL_ENV = "CNNEXP_SEARCH_TRIAL"
PRUNER_ATTR = "cnnexp.pruner"  # study user attribute: how trials are pruned
PRUNERS = ("median", "successive_halving", "hyperband", "none")


@dataclass(frozen=True)
class TrialLink:
    """Where a job reports to: the study's storage URL and name, and its trial."""

    storage: str
    study: str
    trial_id: int
    number: int

    def to_env(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, environ=os.environ) -> TrialLink | None:
        text = environ.get(TRIAL_ENV)
        return cls(**json.loads(text)) if text else None


def build_pruner(spec: dict):
    """An Optuna pruner from the spec the sweeper stores with the study.

    spec: name (one of PRUNERS), min_epochs (the first epoch after which a
    trial may be pruned), startup_trials (median: trials that must finish
    first), max_epochs (hyperband's full budget) and options (extra keyword
    arguments for the Optuna class)."""
    optuna = require_optuna()
    name, options = spec["name"], dict(spec.get("options") or {})
    min_epochs = int(spec.get("min_epochs", 1))
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        options.setdefault("n_startup_trials", int(spec.get("startup_trials", 5)))
        options.setdefault("n_warmup_steps", min_epochs)
        return optuna.pruners.MedianPruner(**options)
    if name == "successive_halving":
        options.setdefault("min_resource", min_epochs)
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    if name == "hyperband":
        options.setdefault("min_resource", min_epochs)
        options.setdefault("max_resource", spec.get("max_epochs") or "auto")
        return optuna.pruners.HyperbandPruner(**options)
    raise ValueError(f"unknown pruner {name!r}; use one of {', '.join(PRUNERS)}")


class PruningReporter(RunObserver):
    """Reports each epoch's objective value to the trial; raises StopRun("pruned") when told."""

    def __init__(self, link: TrialLink):
        self.link = link

    def on_start(self, cfg: DictConfig, run_dir: Path, rows: list[dict]) -> None:
        optuna = require_optuna()
        storage = open_storage(self.link.storage)
        pruner_spec = storage.get_study_user_attrs(storage.get_study_id_from_name(self.link.study)).get(
            PRUNER_ATTR, {"name": "none"})
        study = optuna.load_study(study_name=self.link.study, storage=storage, pruner=build_pruner(pruner_spec))
        self.trial = optuna.trial.Trial(study, self.link.trial_id)
        self.objective = objective.from_config(cfg)
        self.max_epochs = int(cfg.trainer.max_epochs)
        self.rows = list(rows)
        self.trial.set_user_attr("run_dir", str(Path(run_dir).resolve()))
        reported = storage.get_trial(self.link.trial_id).intermediate_values
        for i in range(len(self.rows)):  # a resumed trial: epochs it ran before the stop
            if self.rows[i]["epoch"] not in reported:
                self.trial.report(objective.epoch_value(self.objective, self.rows[: i + 1]), self.rows[i]["epoch"])

    def on_epoch(self, row: dict) -> None:
        self.rows.append(row)
        value = objective.epoch_value(self.objective, self.rows)
        self.trial.report(value, row["epoch"])
        if row["epoch"] < self.max_epochs and self.trial.should_prune():
            raise StopRun("pruned", f"pruned by the search after epoch {row['epoch']} "
                                    f"({self.objective} {value:.4g} so far)")


def search_observers() -> list[RunObserver]:
    """The pruning reporter when this job is a search trial, else nothing."""
    link = TrialLink.from_env()
    return [PruningReporter(link)] if link else []
