"""A search's results read well and say the truth: summary.csv ranked, failed
trials counted as failures, pruning's savings from pruned trials only, the last
epoch never pruned, a study never mixed with another question, a damaged or
missing study never recreated, a locked database retried, passwords hidden."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cnnexp import plot
from cnnexp.errors import ConfigError
from cnnexp.observers import Observers
from cnnexp.run.loop import train
from cnnexp.sweep import search, storage
from cnnexp.sweep.pruning import PRUNER_ATTR, PruningReporter, TrialLink
from cnnexp.sweep.table import failed_jobs_line
from conftest import SMALL

optuna = pytest.importorskip("optuna")

from hydra_plugins.cnnexp_optuna_sweeper._search import (  # noqa: E402
    _check_same_question,
    _enqueued_params,
    _open_study,
)
from hydra_plugins.cnnexp_optuna_sweeper._space import parse  # noqa: E402

METRICS = "epoch,train_loss,train_acc,test_loss,test_acc\n1,2.0,0.3,1.9,0.35\n2,1.8,0.4,1.7,0.42\n"


def fake_job(sweep: Path, number: int, status: str, value: float | None = None, epochs: int = 2) -> None:
    """A trial's job dir as a finished job leaves it (run.json, metrics.csv, overrides)."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={0.001 * (number + 1)}\n")
    (job / ".hydra" / "config.yaml").write_text("trainer:\n  max_epochs: 2\n")
    (job / "metrics.csv").write_text("".join(METRICS.splitlines(keepends=True)[: epochs + 1]))
    record = {"status": status, "overrides": [f"optim.lr={0.001 * (number + 1)}"], "epochs_completed": epochs,
              "wall_seconds": 2.0 * epochs}
    if value is not None:
        record["objective_value"] = value
    if status == "failed":
        record["error"] = "TrainingDiverged: the loss became nan"
    (job / "run.json").write_text(json.dumps(record))


def made_search(tmp_path: Path, direction: str = "maximize") -> tuple[Path, object]:
    """A search's sweep dir with a study of five trials: three complete, one pruned, one failed."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    url = storage.resolve(None, sweep)
    study = optuna.create_study(study_name="cnnexp", storage=url, direction=direction)
    dist = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    outcomes = [("completed", 0.30), ("completed", 0.50), ("pruned", None), ("failed", None), ("completed", 0.40)]
    for number, (status, value) in enumerate(outcomes):
        trial = study.ask({"optim.lr": dist})
        trial.report(0.2, 1)
        if status == "completed":
            study.tell(trial, value)
        elif status == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        fake_job(sweep, number, status, value, epochs=1 if status == "pruned" else 2)
    search.write_marker(sweep, url, study_name="cnnexp", objective="best_val_acc", direction=direction,
                        sampler="tpe", pruner="median", max_epochs=2)
    return sweep, study


# ---------------------------------------------------------------- summary.csv, best.txt
def test_summary_is_ranked_by_the_objective_best_first(tmp_path):
    sweep, _ = made_search(tmp_path)
    table = search.write_search_summary(sweep)
    written = pd.read_csv(sweep / "summary.csv")
    assert list(written.columns[:3]) == ["rank", "trial", "state"]
    assert list(written["trial"]) == [1, 4, 0, 2, 3]  # 0.5, 0.4, 0.3, then the unranked in trial order
    assert list(written["rank"].iloc[:3]) == [1, 2, 3] and written["rank"].iloc[3:].isna().all()
    assert list(table["state"]) == ["complete", "complete", "complete", "pruned", "fail"]


def test_a_minimised_objective_ranks_the_smallest_first(tmp_path):
    sweep, _ = made_search(tmp_path, direction="minimize")
    search.write_search_summary(sweep)
    assert list(pd.read_csv(sweep / "summary.csv")["trial"].iloc[:3]) == [0, 4, 1]


def test_pruning_savings_count_pruned_trials_only(tmp_path):
    sweep, _ = made_search(tmp_path)
    search.write_search_summary(sweep)
    text = (sweep / "best.txt").read_text()
    assert "Trials: 5 (3 completed, 1 pruned, 1 failed)" in text
    # 3 completed x 2 epochs + the pruned trial's 1 of 2: the failed trial saved nothing.
    assert "Epochs trained: 7 of 8" in text and "pruning 1 trial(s) saved 1 epochs (12 %)" in text
    nothing_pruned = pd.DataFrame({"state": ["complete", "fail", "fail"], "epochs": [2, 0, 0],
                                   "max_epochs": [2, 2, 2]})
    assert search.pruning_savings(nothing_pruned) is None


def test_failed_and_unfinished_trials_are_named_waiting_ones_are_not(tmp_path):
    sweep, _ = made_search(tmp_path)
    table = search.write_search_summary(sweep)
    assert failed_jobs_line(table) == ("1 of 5 sweep trials did not complete: trial 3 failed "
                                       "(TrainingDiverged: the loss became nan)")
    more = pd.concat([table, pd.DataFrame({"trial": [5, 6], "state": ["running", "waiting"], "status": ["", ""],
                                           "error": ["", ""]})])
    line = failed_jobs_line(more)
    assert line.startswith("2 of 6 sweep trials did not complete: trial 3 failed") and "trial 5 did not finish" in line


def test_search_yaml_records_the_storage_used_and_the_dir_can_move(tmp_path):
    sweep, study = made_search(tmp_path)
    info = search.read_marker(sweep)
    assert info["storage"] == f"sqlite:///{sweep.resolve() / 'optuna.db'}" and info["storage_file"] == "optuna.db"
    moved = tmp_path / "moved"
    sweep.rename(moved)
    reopened, _ = search.open_study(moved)
    assert len(reopened.get_trials()) == 5


# ---------------------------------------------------------------- figures
def test_history_marks_pruned_trials_and_importances_wait_for_enough_trials(tmp_path):
    sweep, study = made_search(tmp_path)
    written = search.render_study_figures(study, sweep, "best_val_acc")
    names = {p.name for p in written}
    assert {"search_history.png", "search_curves.png", "search_importances.png"} <= names
    assert all(p.stat().st_size > 1000 for p in written)
    fig = search._history(study.get_trials(), study, search._Units("best_val_acc"))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["completed", "best so far", "pruned (value when stopped)"]
    assert fig.axes[0].get_ylabel() == "best_val_acc (%)"
    note = search._importances(study.get_trials(), study, search._Units("best_val_acc"))
    assert "need at least 8 completed trials" in note.axes[0].texts[0].get_text()  # 3 are not enough


# ---------------------------------------------------------------- the last epoch is never pruned
def test_a_trial_that_ran_its_last_epoch_is_completed_not_pruned(compose_cfg, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="minimize")
    study.set_user_attr(PRUNER_ATTR, {"name": "median", "startup_trials": 2, "min_epochs": 1})
    for value in (0.1, 0.2):  # two finished trials far better after epoch 1
        done = study.ask()
        done.report(value, 1)
        study.tell(done, value)
    trial = study.ask()
    trial_id = storage.open_storage(url).get_trial_id_from_study_id_trial_number(
        storage.open_storage(url).get_study_id_from_name("s"), trial.number)
    cfg = compose_cfg([*SMALL, "trainer.max_epochs=1", "trainer.device=cpu", "trainer.progress=none",
                       "trainer.cpu_step=eager"])
    result = train(cfg, tmp_path, torch.device("cpu"), lambda: None,
                   observers=Observers([PruningReporter(TrialLink(url, "s", trial_id, trial.number))]))
    assert len(result.rows) == 1  # no StopRun: its one epoch was its last
    assert list(study.trials[trial.number].intermediate_values) == [1]


# ---------------------------------------------------------------- the same question, or a refusal
def _study_with_one_trial(tmp_path, space):
    study = optuna.create_study(study_name="cnnexp", storage=f"sqlite:///{tmp_path / 'q.db'}", direction="maximize")
    study.set_user_attr("cnnexp.objective", "best_val_acc")
    trial = study.ask(space.distributions)
    study.tell(trial, 0.5)
    return study


def test_a_study_rerun_with_another_space_or_objective_is_refused(compose_cfg, tmp_path):
    cfg = compose_cfg(["data=synthetic"])
    first = parse(["optim.lr=tag(log, interval(1e-4, 1e-1))", "optim.momentum=interval(0.5, 0.99)"], cfg)
    study = _study_with_one_trial(tmp_path, first)
    _check_same_question(study, first, "best_val_acc", False, "sqlite:///q.db")  # the same: fine
    other = parse(["optim.lr=tag(log, interval(1e-3, 1e-1))", "data.batch_size=choice(4, 16)"], cfg)
    with pytest.raises(ConfigError) as refused:
        _check_same_question(study, other, "best_val_acc", False, "sqlite:///q.db")
    said = str(refused.value)
    assert "optim.momentum is no longer searched" in said and "data.batch_size is new (choice(4, 16))" in said
    assert "optim.lr was tag(log, interval(0.0001, 0.1)), now tag(log, interval(0.001, 0.1))" in said
    assert "hydra.sweeper.extend=true" in said and "hydra.sweep.dir" in said
    _check_same_question(study, other, "best_val_acc", True, "sqlite:///q.db")  # extend: allowed
    with pytest.raises(ConfigError, match="searched for the best best_val_acc, but trainer.objective is now "
                                          "final_val_acc"):
        _check_same_question(study, first, "final_val_acc", True, "sqlite:///q.db")


def test_an_enqueued_value_outside_its_space_is_refused(compose_cfg):
    space = parse(["optim.lr=tag(log, interval(1e-4, 1e-1))", "data.batch_size=choice(4, 16)"],
                  compose_cfg(["data=synthetic"]))
    assert _enqueued_params({"optim.lr": 0.001, "data.batch_size": 16}, space) == {"optim.lr": 0.001,
                                                                                  "data.batch_size": 16}
    with pytest.raises(ConfigError, match=r"optim.lr=0.5, outside its search space tag\(log, interval\("):
        _enqueued_params({"optim.lr": 0.5}, space)
    with pytest.raises(ConfigError, match=r"data.batch_size=8, outside its search space choice\(4, 16\)"):
        _enqueued_params({"data.batch_size": 8}, space)


# ---------------------------------------------------------------- passwords, damaged and locked studies
def test_a_storage_password_is_never_printed():
    assert storage.masked("postgresql://me:s3cret@db.example/cnnexp") == "postgresql://me:***@db.example/cnnexp"
    assert storage.masked("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    with pytest.raises(ConfigError) as refused:  # nothing listens on port 1: refused at once
        _open_study(optuna, "postgresql://me:s3cret@127.0.0.1:1/cnnexp", "cnnexp", None, None, "maximize")
    assert "s3cret" not in str(refused.value) and "me:***@127.0.0.1:1" in str(refused.value)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_plot_draws_a_search_whose_study_is_missing_or_damaged_from_its_job_dirs(tmp_path, capsys, damage):
    sweep, _ = made_search(tmp_path)
    db = sweep / "optuna.db"
    if damage == "missing":
        db.unlink()
    else:
        db.write_bytes(b"this is not a database" * 100)
    before = db.read_bytes() if db.exists() else None
    assert plot.main([str(sweep)]) in (0, 1)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert (db.read_bytes() if db.exists() else None) == before  # no study created, none rewritten
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["job"]) == [0, 1, 2, 3, 4]  # the job dirs' own summary
    assert (sweep / "compare_test_acc.png").is_file()


def test_a_locked_sqlite_study_is_waited_for_then_named(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "SQLITE_BUSY_TIMEOUT_S", 0.1)
    path = tmp_path / "optuna.db"
    url = f"sqlite:///{path}"
    study = optuna.create_study(study_name="s", storage=storage.open_storage(url))

    def hold_lock(seconds: float):
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        holder.execute("ROLLBACK")
        holder.close()

    locker = threading.Thread(target=hold_lock, args=(1.5,))
    locker.start()
    time.sleep(0.2)
    trial = study.ask()  # waits for the lock, then goes on
    study.tell(trial, 1.0)
    locker.join()
    assert [t.value for t in study.trials] == [1.0]

    monkeypatch.setattr(storage, "LOCK_WAIT_S", 1.0)
    locker = threading.Thread(target=hold_lock, args=(4.0,))
    locker.start()
    time.sleep(0.2)
    with pytest.raises(storage.StudyLocked) as stuck:
        study.ask()
    locker.join()
    said = str(stuck.value)
    assert said.startswith(f"The study's database {url} stayed unusable for 1 s (database is locked)")
    assert "\n" not in said


# ---------------------------------------------------------------- one clear line for small mistakes
def test_a_malformed_search_override_is_one_line_naming_its_key(capsys):
    from cnnexp.cli import check_override_syntax

    check_override_syntax(["-m", "hydra/sweeper=optuna", "optim.lr=tag(log, interval(1e-4, 1e-1))", "--cfg",
                           "job"])  # readable: nothing said
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as stop:
        check_override_syntax(["-m", "optim.lr=interval(1e-3"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnexp: error: cannot read the override 'optim.lr=interval(1e-3' "
                                                   "for optim.lr: ")


def test_a_slurm_controller_that_does_not_answer_is_said_once(monkeypatch):
    from cnnexp.sweep import slurm

    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")

    def hangs(command, name, stdin=None):
        raise ConfigError(f"hydra/launcher=slurm: {name} did not answer within 60 s; "
                          "is the SLURM controller (slurmctld) up?")

    monkeypatch.setattr(slurm, "_slurm", hangs)
    with pytest.raises(ConfigError) as refused:
        slurm.check_cluster({"partition": None})
    assert str(refused.value).lower().count("slurm controller (slurmctld) up?") == 1


@pytest.mark.slow
def test_a_grid_sweep_says_nothing_of_searches(tmp_path):
    from conftest import run_cli

    result = run_cli(["-m", *SMALL, "data.n_train=200", "data.n_test=100", "trainer.max_epochs=1",
                      "trainer.cpu_step=eager", "trainer.progress=none", "optim.lr=0.01,0.02", "hydra/launcher=joblib",
                      "hydra.launcher.n_jobs=2", "hydra.sweep.dir=grid"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr + "".join(p.read_text() for p in (tmp_path / "grid").glob("*/cnnexp.log"))
    assert "search" not in said.lower()
