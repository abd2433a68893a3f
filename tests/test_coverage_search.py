"""The search's documented settings, checked in this process without running trials:
samplers and their options, grid's trial cap, n_jobs, pruner options, pruners
that really stop a trial, the errors a search refuses with, best.txt's
totals, the study figures and the warning of a search that tunes on the test split.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pandas as pd
import pytest

from cnnexp.errors import ConfigError
from cnnexp.observers import StopRun
from cnnexp.sweep.pruning import PRUNER_ATTR, PruningReporter, TrialLink, build_pruner
from conftest import SMALL

optuna = pytest.importorskip("optuna")
from hydra_plugins.cnnexp_optuna_sweeper._search import Search  # noqa: E402
from hydra_plugins.cnnexp_optuna_sweeper.config import CnnexpOptunaSweeperConf  # noqa: E402

LR = "optim.lr=tag(log, interval(1e-4, 1e-1))"


class FakeSweeper:
    """What Search.prepare asks of the sweeper: its launcher and a config check."""

    launcher = None

    def validate_batch_is_legal(self, batch):
        pass


def settings(**overrides) -> dict:
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(CnnexpOptunaSweeperConf) if f.name != "_target_"}
    return {**defaults, **overrides}


@pytest.fixture
def prepare(compose_cfg, tmp_path):
    """Search.prepare for these settings, arguments and extra config overrides; the sweep dir is tmp_path."""

    from hydra import compose, initialize_config_dir

    from cnnexp.cli import config_dir

    def _prepare(arguments=(LR,), config=(), **setting_overrides):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True,
                          overrides=[*SMALL, "trainer.max_epochs=4", *config, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
        return Search.prepare(settings(**setting_overrides), cfg, list(arguments), FakeSweeper())

    return _prepare


# ------------------------------------------------------------------ samplers, trials, workers
@pytest.mark.parametrize("name, kind", [("tpe", "TPESampler"), ("random", "RandomSampler"),
                                        ("cmaes", "CmaEsSampler"), ("grid", "GridSampler")])
def test_each_sampler_is_the_one_named(prepare, name, kind):
    arguments = ["optim.lr=choice(0.001, 0.01)"] if name == "grid" else [LR, "optim.momentum=interval(0.5, 0.9)"]
    search = prepare(arguments, sampler=name)
    assert type(search.study.sampler).__name__ == kind
    assert search.spec.sampler["sampler"] == name


def test_grid_caps_the_trials_at_the_grid_size(prepare):
    grid = ["optim.lr=choice(0.001, 0.01, 0.1)", "data.batch_size=choice(4, 8)"]
    assert prepare(grid, sampler="grid", n_trials=20).spec.limit == 6
    assert prepare(grid, sampler="grid", n_trials=4).spec.limit == 4
    assert prepare([LR], sampler="random", n_trials=20).spec.limit == 20


def test_n_jobs_sets_the_workers_else_the_launcher_does(prepare):
    assert prepare(n_jobs=3).n_jobs == 3 and prepare(n_jobs=3).spec.workers == 3
    assert prepare(n_jobs=None).n_jobs == 1
    with pytest.raises(ConfigError, match=r"hydra.sweeper.n_jobs=0 must be at least 1"):
        prepare(n_jobs=0)


def test_sampler_and_pruner_options_reach_optuna(prepare):
    from hydra_plugins.cnnexp_optuna_sweeper._worker import build_sampler

    search = prepare(pruner="successive_halving", pruner_options={"reduction_factor": 2, "min_early_stopping_rate": 1})
    pruner = search.study.pruner
    assert (pruner._reduction_factor, pruner._min_early_stopping_rate, pruner._min_resource) == (2, 1, 1)
    assert search.study.user_attrs[PRUNER_ATTR]["options"] == {"reduction_factor": 2, "min_early_stopping_rate": 1}
    space = search.spec.space
    sampler = build_sampler(settings(sampler="tpe", sampler_options={"n_startup_trials": 3}), space)
    assert sampler._n_startup_trials == 3
    with pytest.raises(ConfigError, match=r"hydra.sweeper.pruner_options=.*successive_halving"):
        prepare(pruner="successive_halving", pruner_options={"patience": 3})
    with pytest.raises(ConfigError, match=r"hydra.sweeper.sampler_options=.*random"):
        prepare(sampler="random", sampler_options={"n_startup_trials": 3})


# ------------------------------------------------------------------ refused before any trial
def test_nothing_to_search_is_refused(prepare):
    with pytest.raises(ConfigError, match="Nothing to search"):
        prepare(["optim.lr=0.01"])


@pytest.mark.parametrize("entry, words", [
    ("not a map", "maps of searched keys to values"),
    ({"optim.momentum": 0.9}, "names optim.momentum, which is not searched"),
    ({"optim.lr": 0.5}, "optim.lr=0.5, outside its search space"),
])
def test_enqueue_errors_name_the_entry(prepare, entry, words):
    with pytest.raises(ConfigError, match=words):
        prepare(enqueue=[entry])


def test_a_study_that_answers_another_question_is_refused(prepare, tmp_path):
    first = prepare(n_trials=5)  # maximise nothing yet: final_test_loss is minimised
    trial = first.study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    first.study.tell(trial, 1.0)
    with pytest.raises(ConfigError, match="was made to minimize .* asks to maximize"):
        prepare(config=["trainer.objective=final_test_acc"])
    with pytest.raises(ConfigError, match="searched another space"):
        prepare(["optim.lr=interval(0.001, 0.01)"])
    extended = prepare(["optim.lr=interval(0.001, 0.01)"], extend=True)
    assert len(extended.study.trials) == 1  # the same study, continued


# ------------------------------------------------------------------ pruners that stop a trial
def study_with_good_trials(tmp_path, pruner: dict, n: int, max_epochs: int):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                pruner=build_pruner({**pruner, "max_epochs": max_epochs}))
    study.set_user_attr(PRUNER_ATTR, pruner)
    for k in range(n):  # finished trials that learned well, asking the pruner after each epoch as trials do
        done = study.ask()
        for epoch in range(1, max_epochs + 1):
            done.report(0.5 + 0.01 * k + 0.02 * epoch, epoch)
            done.should_prune()
        study.tell(done, 0.5 + 0.01 * k + 0.02 * max_epochs)
    return storage, study


@pytest.mark.parametrize("pruner", [{"name": "successive_halving", "min_epochs": 1},
                                    {"name": "hyperband", "min_epochs": 1},
                                    {"name": "median", "min_epochs": 1, "startup_trials": 2}])
def test_each_pruner_stops_a_hopeless_trial_before_its_last_epoch(tmp_path, compose_cfg, pruner):
    # Hyperband puts a trial in a bracket by a hash of the study name and trial number:
    # trial 12 of study "s" lands in the bracket that judges after epoch 1.
    storage, study = study_with_good_trials(tmp_path, pruner, n=12, max_epochs=3)
    trial = study.ask()
    reporter = PruningReporter(TrialLink(storage, "s", trial._trial_id, trial.number))
    cfg = compose_cfg([*SMALL, "trainer.max_epochs=3", "trainer.objective=final_test_acc"])
    reporter.on_start(cfg, tmp_path, [])
    with pytest.raises(StopRun) as stop:
        for epoch in (1, 2):
            reporter.on_epoch({"epoch": epoch, "test_acc": 0.1, "test_loss": 2.3})
    assert stop.value.status == "pruned"
    assert list(study.trials[trial.number].intermediate_values) == [1]
    assert "after epoch 1" in str(stop.value)


def test_no_pruner_lets_every_trial_finish(tmp_path, compose_cfg):
    storage, study = study_with_good_trials(tmp_path, {"name": "none"}, n=4, max_epochs=3)
    trial = study.ask()
    reporter = PruningReporter(TrialLink(storage, "s", trial._trial_id, trial.number))
    reporter.on_start(compose_cfg([*SMALL, "trainer.max_epochs=3", "trainer.objective=final_test_acc"]), tmp_path, [])
    for epoch in (1, 2, 3):
        reporter.on_epoch({"epoch": epoch, "test_acc": 0.1})
    assert list(study.trials[trial.number].intermediate_values) == [1, 2, 3]


# ------------------------------------------------------------------ best.txt and the figures
def test_pruning_savings_count_pruned_trials_and_their_epochs():
    from cnnexp.sweep.search import pruning_savings

    table = pd.DataFrame({"state": ["complete", "pruned", "pruned", "fail"], "epochs": [10, 2, 10, 1],
                          "max_epochs": [10, 10, 10, 10], "wall_seconds": [100.0, 20.0, 100.0, 5.0]})
    assert pruning_savings(table) == (
        "Epochs trained: 22 of 30 (completed and pruned trials, each to its last epoch); pruning 1 trial(s) saved "
        "8 epochs (27 %), about 80 s of training")
    assert pruning_savings(table[table["state"] != "pruned"]) is None


def study_of(n: int):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        trial = study.ask()
        lr = trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
        momentum = trial.suggest_float("optim.momentum", 0.5, 0.95)
        value = 0.5 + 0.1 * math.log10(lr) / 4 + 0.01 * momentum
        trial.report(value, 1)
        study.tell(trial, value)
    return study


def test_study_figures_include_importances_and_parallel_coordinates(tmp_path, monkeypatch):
    from cnnexp.sweep import search

    drawn = {}
    original = search._optuna_figure

    def spy(function, study, units, values_axis="y"):
        fig = original(function, study, units, values_axis)
        drawn[function] = fig
        return fig

    monkeypatch.setattr(search, "_optuna_figure", spy)
    study = study_of(8)
    written = search.render_study_figures(study, tmp_path, "final_test_acc")
    assert [p.name for p in written] == list(search.STUDY_FIGURES)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    importances = optuna.importance.get_param_importances(study)
    bars = {t.get_text(): None for t in drawn["plot_param_importances"].axes[0].get_yticklabels()}
    assert set(bars) == set(importances) == {"optim.lr", "optim.momentum"}
    assert "plot_parallel_coordinate" in drawn and drawn["plot_parallel_coordinate"] is not None


def test_importances_of_too_few_trials_say_so_instead(tmp_path):
    import matplotlib.pyplot as plt

    from cnnexp.sweep import search

    fig = search._importances(study_of(5).get_trials(), study_of(5), search._Units("final_test_acc"))
    (text,) = fig.axes[0].texts
    assert "need at least 8 completed trials" in text.get_text() and "this search has 5" in text.get_text()
    plt.close(fig)


# ------------------------------------------------------------------ a search that tunes on the test split says so
@pytest.mark.parametrize("config, warned", [([], True), (["data.val_size=0.2"], False),
                                            (["data.val_size=0.2", "trainer.objective=final_test_acc"], True)])
def test_a_search_warns_once_when_its_objective_is_on_the_test_split(prepare, caplog, config, warned):
    caplog.set_level(logging.WARNING, logger="cnnexp")
    prepare(config=config)
    warnings = [r.getMessage() for r in caplog.records if "not measured on a validation split" in r.getMessage()]
    assert len(warnings) == int(warned), warnings


def test_a_sweep_dir_that_holds_another_studys_jobs_is_refused(prepare, tmp_path):
    from cnnexp.results.record import RunRecord
    from hydra_plugins.cnnexp_optuna_sweeper._worker import Worker

    search = prepare()
    RunRecord(tmp_path / "sweep" / "0", overrides=["optim.lr=0.5"]).finish("completed")  # another study's trial 0
    with pytest.raises(ConfigError, match="this sweep dir belongs to another study"):
        Worker(search.spec, 0, None).next_trial(search.study)
    assert search.study.trials[0].state == optuna.trial.TrialState.FAIL  # the trial asked for is not left running
