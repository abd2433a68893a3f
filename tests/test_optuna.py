"""The Optuna sweeper: found by Hydra, searches, prunes across processes, continues a study, refuses bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cnnexp import plot
from cnnexp.observers import Observers, StopRun
from cnnexp.run.loop import train
from cnnexp.sweep.pruning import PRUNER_ATTR, TRIAL_ENV, PruningReporter, TrialLink, build_pruner
from cnnexp.sweep.table import failed_jobs_line
from conftest import SMALL, run_cli, start_cli, wait_for_rows

optuna = pytest.importorskip("optuna")
REPO = Path(__file__).resolve().parents[1]

SEARCH = ["-m", "hydra/sweeper=optuna", *SMALL, "trainer.device=cpu"]
# Three learning rates tried in this order: two that learn, then one that cannot.
HOPELESS = ["optim.lr=choice(0.02, 0.01, 1e-7)",
            "hydra.sweeper.enqueue=[{optim.lr: 0.02}, {optim.lr: 0.01}, {optim.lr: 1e-7}]",
            "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=median", "hydra.sweeper.pruner_startup_trials=2",
            "hydra.sweeper.pruner_min_epochs=1", "trainer.max_epochs=3"]


def load_study(sweep_dir):
    return optuna.load_study(study_name="cnnexp", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def record(job_dir) -> dict:
    return json.loads((job_dir / "run.json").read_text())


def metrics_rows(job_dir) -> list[dict]:
    with open(job_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- discovery, search space
def test_hydra_lists_the_sweeper_plugin(tmp_path):
    result = run_cli(["--info", "plugins"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    sweepers = result.stdout.split("Sweeper:")[1].split("Launcher:")[0]
    assert "CnnexpOptunaSweeper" in sweepers


def test_search_space_in_hydra_grammar(compose_cfg):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.cnnexp_optuna_sweeper._space import parse

    cfg = compose_cfg(["data=synthetic"])
    space = parse(["trainer.max_epochs=3", "optim.lr=tag(log, interval(1e-4, 1e-1))",
                   "optim.momentum=interval(0, 1)", "data.batch_size=choice(4, 16, 64)",
                   "trainer.seed=range(0, 10, 3)", "data.n_train=interval(100, 400)"], cfg)
    d = space.distributions
    assert d["optim.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["optim.momentum"] == FloatDistribution(0.0, 1.0)  # a float key stays float with int-looking ends
    assert d["data.batch_size"] == CategoricalDistribution([4, 16, 64])
    assert d["trainer.seed"] == IntDistribution(0, 9, step=3)  # range() excludes its stop, as in Hydra
    assert d["data.n_train"] == IntDistribution(100, 400)  # an int key samples ints
    assert space.overrides({"optim.lr": 0.01, "optim.momentum": 0.5, "data.batch_size": 16, "trainer.seed": 3,
                            "data.n_train": 200}) == [
        "trainer.max_epochs=3", "optim.lr=0.01", "optim.momentum=0.5", "data.batch_size=16", "trainer.seed=3",
        "data.n_train=200"]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, names", [
    (["hydra.sweeper.sampler=anneal", "optim.lr=interval(0.001, 0.01)"], "hydra.sweeper.sampler"),
    (["hydra.sweeper.pruner=patient", "optim.lr=interval(0.001, 0.01)"], "hydra.sweeper.pruner"),
    (["optim.lr=interval(0.1, 0.01)"], "optim.lr"),
    (["optim.lr=tag(log, interval(0, 0.1))"], "optim.lr"),
    (["hydra.sweeper.storage=sqlite:////no/such/dir/study.db", "optim.lr=interval(0.001, 0.01)"],
     "hydra.sweeper.storage"),
])
def test_bad_search_input_is_one_line_and_trains_nothing(tmp_path, args, names):
    result = run_cli([*SEARCH, "hydra.sweep.dir=sweep", *args], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in result.stderr, result.stderr
    sweep = tmp_path / "sweep"
    assert not sweep.exists() or not any(p.name.isdigit() for p in sweep.iterdir())


# ---------------------------------------------------------------- the job side of pruning
def test_reporter_stops_a_trial_worse_than_the_median(compose_cfg, tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="minimize")
    study.set_user_attr(PRUNER_ATTR, {"name": "median", "startup_trials": 2, "min_epochs": 1})
    for value in (0.1, 0.2):  # two finished trials that did far better after epoch 1
        done = study.ask()
        done.report(value, 1)
        study.tell(done, value)
    trial = study.ask()
    monkeypatch.setenv(TRIAL_ENV, TrialLink(storage, "s", trial._trial_id, trial.number).to_env())
    cfg = compose_cfg([*SMALL, "trainer.max_epochs=3", "trainer.device=cpu", "trainer.progress=none"])
    with pytest.raises(StopRun) as stop:
        train(cfg, tmp_path, torch.device("cpu"), lambda: None, observers=Observers([PruningReporter(
            TrialLink.from_env())]))
    assert stop.value.status == "pruned" and "after epoch 1" in str(stop.value)
    assert len(metrics_rows(tmp_path)) == 1  # the epoch it ran is on disk
    reported = study.trials[trial.number]
    assert list(reported.intermediate_values) == [1] and reported.intermediate_values[1] > 2.0
    assert reported.user_attrs["run_dir"] == str(tmp_path.resolve())


def test_pruner_specs_build_optunas_pruners():
    assert isinstance(build_pruner({"name": "none"}), optuna.pruners.NopPruner)
    assert isinstance(build_pruner({"name": "successive_halving", "min_epochs": 2}),
                      optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(build_pruner({"name": "hyperband", "min_epochs": 1, "max_epochs": 9}),
                      optuna.pruners.HyperbandPruner)
    with pytest.raises(ValueError):
        build_pruner({"name": "patient"})


def test_a_pruned_trial_is_not_a_failure():
    table = pd.DataFrame({"trial": [0, 1, 2], "status": ["completed", "pruned", "failed"],
                          "error": ["", "", "boom"]})
    assert failed_jobs_line(table) == "1 of 3 sweep trials did not complete: trial 2 failed (boom)"
    assert failed_jobs_line(table.iloc[:2]) is None


# ---------------------------------------------------------------- whole searches
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_hopeless_trial_is_pruned_early(tmp_path, launcher):
    """Two trials learn; the third (lr 1e-7) cannot and is stopped after its first epoch,
    also when the trials run in other processes."""
    # Two workers: the one that takes trial 2 has completed a trial, its neighbour may still be
    # training; one completed trial to compare against makes the pruning decision independent of that race.
    extra = (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.pruner_startup_trials=1"]
             if launcher == "joblib" else [])
    result = run_cli([*SEARCH, "hydra.sweep.dir=sweep", *HOPELESS, *extra], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    study = load_study(sweep)
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    hopeless = sweep / "2"
    assert record(hopeless)["status"] == "pruned"
    assert len(metrics_rows(hopeless)) == 1 and len(metrics_rows(sweep / "0")) == 3
    assert (hopeless / "plots" / "test_acc.png").is_file()  # its run dir is complete for the epoch it ran
    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["state"]) == ["complete", "complete", "pruned"]
    assert list(summary["epochs"]) == [3, 3, 1]
    assert "did not complete" not in result.stderr
    best = (sweep / "best.txt").read_text().splitlines()
    assert best[1] == "Trials: 3 (2 completed, 1 pruned)"
    assert best[2].startswith("Epochs trained: 7 of 9 (completed and pruned trials, each to its last epoch); "
                              "pruning 1 trial(s) saved 2 epochs (22 %)")
    assert f"Best trial: {study.best_trial.number}, " in best[3]
    # The trial's link to the study is a Hydra setting: its own config and overrides are the user's.
    overrides = yaml.safe_load((hopeless / ".hydra" / "overrides.yaml").read_text())
    assert "optim.lr=1e-07" in overrides and not any(TRIAL_ENV in o for o in overrides)


@pytest.fixture(scope="module")
def small_search(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("search")
    args = [*SEARCH, "hydra.sweep.dir=sweep", "trainer.max_epochs=2", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.pruner=none", "optim.lr=tag(log, interval(1e-3, 3e-2))", "optim.momentum=interval(0.5, 0.95)"]
    result = run_cli(args, cwd=cwd)
    return cwd, args, result


@pytest.mark.slow
def test_a_search_records_every_trial_and_names_the_best(small_search):
    cwd, _, result = small_search
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = cwd / "sweep"
    study = load_study(sweep)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["trial"]) == [0, 1, 2]
    for t in study.trials:
        row = summary[summary["trial"] == t.number].iloc[0]
        assert math.isclose(row["optim.lr"], t.params["optim.lr"]) and math.isclose(row["objective"], t.value)
        assert record(sweep / str(t.number))["status"] == "completed"
        assert 1e-3 <= t.params["optim.lr"] <= 3e-2 and 0.5 <= t.params["optim.momentum"] <= 0.95
    assert len({t.params["optim.lr"] for t in study.trials}) == 3
    best = study.best_trial
    text = (sweep / "best.txt").read_text()
    assert f"Best trial: {best.number}" in text and f"optim.lr={best.params['optim.lr']!r}" in text
    assert "Trials: 3 (3 completed, 0 pruned)" in text.splitlines()
    assert f"optim.lr={best.params['optim.lr']!r}" in result.stderr + result.stdout  # printed at the end
    for name in ("search_history.png", "search_curves.png", "search_slice.png", "compare_test_acc.png"):
        assert (sweep / name).is_file(), name


@pytest.mark.slow
def test_plot_redraws_a_search_from_the_study_and_job_dirs(small_search):
    cwd, _, _ = small_search
    sweep = cwd / "sweep"
    for name in ("summary.csv", "best.txt", "search_history.png", "compare_test_acc.png"):
        (sweep / name).unlink()
    assert plot.main([str(sweep)]) == 0
    assert len(pd.read_csv(sweep / "summary.csv")) == 3
    assert (sweep / "search_history.png").is_file() and (sweep / "compare_test_acc.png").is_file()
    assert "Best trial" in (sweep / "best.txt").read_text()


@pytest.mark.slow
def test_running_the_command_again_continues_the_study(small_search):
    cwd, args, _ = small_search
    sweep = cwd / "sweep"
    before = {n: (sweep / str(n) / "run.json").stat().st_mtime_ns for n in range(3)}
    first_params = [t.params for t in load_study(sweep).trials]
    result = run_cli([a.replace("n_trials=3", "n_trials=4") for a in args], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(sweep)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert [t.params for t in study.trials[:3]] == first_params  # the earlier trials are kept as they were
    assert study.trials[3].params not in first_params  # a new draw, not a replay of the first
    assert {n: (sweep / str(n) / "run.json").stat().st_mtime_ns for n in range(3)} == before
    assert record(sweep / "3")["status"] == "completed"
    assert yaml.safe_load((sweep / "3" / ".hydra" / "overrides.yaml").read_text())[-1].startswith("optim.momentum=")
    assert len(pd.read_csv(sweep / "summary.csv")) == 4


@pytest.mark.slow
def test_a_stopped_search_continues_its_unfinished_trial_from_the_checkpoint(tmp_path):
    args = [*SEARCH, "hydra.sweep.dir=sweep", "trainer.max_epochs=3", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.pruner=none", "optim.lr=tag(log, interval(1e-3, 3e-2))"]
    proc = start_cli(args, cwd=tmp_path)
    trial0 = tmp_path / "sweep" / "0"
    wait_for_rows(trial0 / "metrics.csv", 1, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the trial checkpoints and the search stops
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert record(trial0)["status"] == "interrupted"
    stopped_rows = metrics_rows(trial0)

    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path / "sweep")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    rows = metrics_rows(trial0)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[: len(stopped_rows)] == stopped_rows
    assert list(study.trials[0].intermediate_values) == [1, 2, 3]
    assert record(tmp_path / "sweep" / "1")["status"] == "completed"


def test_without_optuna_a_search_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['optuna'] = None\n"  # as if optuna were not installed
            "sys.argv = ['cnnexp', '-m', 'hydra/sweeper=optuna', 'data=synthetic', 'optim.lr=interval(0.001, 0.01)',"
            " 'hydra.sweep.dir=sweep']\n"
            "from cnnexp.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cnnexp: error: A search needs the optuna package, which is not installed: pip install 'cnnexp[search]'"]
