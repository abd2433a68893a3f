"""`hydra/sweeper=optuna`: the search's settings, with their defaults."""

# No `from __future__ import annotations` here: Hydra's plugin scan runs this
# module before registering it in sys.modules, which string annotations need.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class CnnexpOptunaSweeperConf:
    _target_: str = "hydra_plugins.cnnexp_optuna_sweeper.optuna_sweeper.CnnexpOptunaSweeper"

    # Trials the study should hold when the command ends: re-running the same
    # command (same hydra.sweep.dir) continues the study up to this number.
    n_trials: int = 20
    # Workers taking trials at once: each asks the study for the next trial as
    # soon as it is free. Processes on this machine, or SLURM jobs under
    # hydra/launcher=slurm. null: the launcher's own n_jobs (joblib), else 1.
    n_jobs: int | None = None
    # tpe | random | cmaes | grid. The direction comes from trainer.objective.
    sampler: str = "tpe"
    seed: int | None = 0  # the sampler's seed: the same command asks the same trials
    sampler_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the Optuna sampler
    # median | successive_halving | hyperband | none
    pruner: str = "median"
    pruner_min_epochs: int = 1  # the first epoch after which a trial may be pruned
    pruner_startup_trials: int = 5  # median: trials that must finish before any is pruned
    pruner_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the Optuna pruner
    # Where the study lives: null (sqlite:///<sweep dir>/optuna.db; under
    # hydra/launcher=slurm the journal file <sweep dir>/optuna.journal),
    # journal (that journal file), journal:PATH, or any database URL Optuna
    # accepts (sqlite:///path.db, postgresql://user@host/db).
    storage: str | None = None
    study_name: str = "cnnexp"
    # Continue a study whose search space differs from this command's (the
    # objective must stay the same); otherwise such a re-run is refused.
    extend: bool = False
    # The search space, in Hydra's override grammar, e.g.
    #   optim.lr: tag(log, interval(1e-4, 1e-1))
    #   data.batch_size: choice(4, 16, 64)
    # Command-line overrides add to it and win.
    params: dict[str, Any] = field(default_factory=dict)
    # Configurations to try first, e.g. [{optim.lr: 0.001, optim.momentum: 0.9}]
    # (a trial that already exists in the study is not enqueued again).
    enqueue: list[Any] = field(default_factory=list)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=CnnexpOptunaSweeperConf,
                             provider="cnnexp")
