"""Early stopping: the rule on the metrics rows, and a run that stops, is recorded and resumes."""

import json

import pytest

from cnnexp.engine.early_stopping import EarlyStopping, monitored_metric
from conftest import SMALL, run_cli


def rows(values, key="val_acc"):
    return [{"epoch": i + 1, key: v} for i, v in enumerate(values)]


def test_stops_after_patience_epochs_without_an_improvement_above_min_delta():
    rule = EarlyStopping("val_acc", patience=2, min_delta=0.01)
    assert not rule.should_stop(rows([0.5, 0.6, 0.605]))  # one epoch without a real gain
    assert rule.should_stop(rows([0.5, 0.6, 0.605, 0.609]))
    assert rule.best_epoch(rows([0.5, 0.6, 0.605, 0.609])) == 2
    assert not EarlyStopping("val_acc", patience=0).should_stop(rows([0.5, 0.4, 0.3]))


def test_a_loss_is_watched_downwards():
    rule = EarlyStopping("val_loss", patience=1)
    assert not rule.should_stop(rows([2.0, 1.5], "val_loss"))
    assert rule.should_stop(rows([2.0, 1.5, 1.6], "val_loss"))


def test_auto_watches_validation_when_there_is_some():
    assert monitored_metric("auto", has_val=True) == "val_acc"
    assert monitored_metric("auto", has_val=False) == "test_acc"


@pytest.mark.slow
def test_a_run_stops_early_as_completed_and_a_resume_keeps_the_stop(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, "trainer.max_epochs=6", "optim.lr=1e-12", "trainer.early_stopping.patience=1",
            f"hydra.run.dir={run_dir}"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "test_acc: the test split then chooses" in first.stderr  # the warning naming the risk
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["early_stopping"]["stopped_at_epoch"] == 2  # no gain at a learning rate of 1e-12
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3
    again = run_cli([f"trainer.resume={run_dir}", "trainer.max_epochs=8", "trainer.progress=log"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3  # no epoch trained after the stop
    assert json.loads((run_dir / "run.json").read_text())["early_stopping"]["stopped_at_epoch"] == 2


def test_early_stopping_on_a_validation_metric_without_a_split_is_refused(tmp_path):
    result = run_cli([*SMALL, "trainer.early_stopping.patience=2", "trainer.early_stopping.monitor=val_acc",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2
    assert "trainer.early_stopping.monitor=val_acc has nothing to monitor" in result.stderr
    assert "Traceback" not in result.stderr
