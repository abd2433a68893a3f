"""What the trackers hold, value by value: every epoch metric, the running loss,
the summary metrics, tags, artifacts and end states, read back with MLflow's
and TensorBoard's own readers.

One in-process run with both trackers and a validation split (no subprocess),
and the MLflow tracker driven directly for the end states and options; every
test shares one SQLite store, because a fresh MLflow database costs seconds.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cnnexp.results.record import RunRecord
from cnnexp.run.job import run_job
from cnnexp.tracking import Tracking
from conftest import SMALL

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

# 80 images, a quarter held out: 60 train, 15 steps an epoch, the running loss every 5 steps.
STEPS_PER_EPOCH, LOG_EVERY = 15, 5
RUN = [*SMALL, "data.n_train=80", "data.n_test=40", "data.val_size=0.25", "trainer.max_epochs=2",
       "trainer.device=cpu", "trainer.progress=none", f"trainer.log_every_steps={LOG_EVERY}",
       "trainer.cpu_step=eager", "trainer.num_threads=1", "optim.lr=0.01", "logger=all", "logger.experiment_name=coverage",
       "logger.log_model=true"]
OVERRIDES = ["optim.lr=0.01", "logger=all"]
EPOCH_COLUMNS = ["train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
                 "train_samples_per_s"]
SUMMARY = ["final_test_acc", "objective_value", "best_val_acc", "test_acc_at_best", "best_epoch"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, store):
    """A finished 2-epoch run with both trackers, a validation split and log_model."""
    from hydra import compose, initialize_config_dir

    from cnnexp.cli import config_dir

    run_dir = tmp_path_factory.mktemp("tracked")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*RUN, f"logger.tracking_uri={store}"])
    # MLflow keeps a SQLite store's artifacts under ./mlruns: run where that is a temp dir, not the checkout.
    cwd = os.getcwd()
    os.chdir(run_dir.parent)
    try:
        assert run_job(cfg, run_dir, multirun=False, overrides=OVERRIDES) == 0
    finally:
        os.chdir(cwd)
    with open(run_dir / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    record = json.loads((run_dir / "run.json").read_text())
    return run_dir, rows, record


def mean_per_epoch(points: dict[int, float]) -> list[float]:
    """The running-loss points of each epoch, averaged: with equal windows that
    tile the epoch, their mean is the epoch's training loss."""
    epochs = sorted({(step - 1) // STEPS_PER_EPOCH + 1 for step in points})
    return [sum(v for s, v in points.items() if (s - 1) // STEPS_PER_EPOCH + 1 == e) / (STEPS_PER_EPOCH // LOG_EVERY)
            for e in epochs]


# ------------------------------------------------------------------ MLflow after a real run
def test_mlflow_holds_every_epoch_metric_with_its_value(tracked_run, store):
    run_dir, rows, record = tracked_run
    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.get_run(record["tracking"]["mlflow"]["run_id"])
    assert list(rows[0]) == ["epoch", *EPOCH_COLUMNS]
    for column in EPOCH_COLUMNS:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, column)}
        assert history == {1: pytest.approx(rows[0][column]), 2: pytest.approx(rows[1][column])}, column


def test_mlflow_running_loss_is_the_mean_loss_of_its_steps(tracked_run, store):
    _, rows, record = tracked_run
    client = mlflow.MlflowClient(tracking_uri=store)
    points = {m.step: m.value for m in client.get_metric_history(record["tracking"]["mlflow"]["run_id"],
                                                                  "train_running_loss")}
    assert sorted(points) == list(range(LOG_EVERY, 2 * STEPS_PER_EPOCH + 1, LOG_EVERY))
    assert all(v > 0.5 for v in points.values())  # a cross-entropy over 10 classes, far from zero
    assert mean_per_epoch(points) == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)


def test_mlflow_summary_metrics_tags_params_and_artifacts(tracked_run, store):
    run_dir, rows, record = tracked_run
    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.get_run(record["tracking"]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "optim.lr=0.01"
    assert client.get_experiment(run.info.experiment_id).name == "coverage"  # logger.experiment_name
    best = max(rows, key=lambda r: r["val_acc"])
    expected = {"final_test_acc": rows[-1]["test_acc"], "objective_value": best["val_acc"],
                "best_val_acc": best["val_acc"], "test_acc_at_best": best["test_acc"], "best_epoch": best["epoch"]}
    for name, value in expected.items():
        assert record[name] == pytest.approx(value), name
        assert run.data.metrics[name] == pytest.approx(value), name
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [0], name
    tags = run.data.tags
    assert tags["status"] == "completed" and tags["device"] == "cpu"
    assert tags["version.torch"] == torch.__version__ and tags["version.cnnexp"] == record["versions"]["cnnexp"]
    assert tags["cnnexp.overrides"] == "optim.lr=0.01 logger=all"
    assert Path(tags["cnnexp.run_dir"]) == run_dir.resolve()
    assert run.data.params["optim.lr"] == "0.01" and run.data.params["data.val_size"] == "0.25"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "per_class.csv", "run.json", "model.pt", "model_best.pt", "plots"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "metrics.csv", str(run_dir / "downloaded")))
    assert local.read_text() == (run_dir / "metrics.csv").read_text()


# ------------------------------------------------------------------ TensorBoard after the same run
def test_tensorboard_holds_every_scalar_with_its_value_including_the_validation_split(tracked_run):
    from cnnexp.tracking.tensorboard_logger import scalar_tag

    run_dir, rows, _ = tracked_run
    (log_dir,) = (run_dir / "tensorboard").iterdir()
    events = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    for column in EPOCH_COLUMNS:
        scalars = events.Scalars(scalar_tag(column))
        assert [s.step for s in scalars] == [1, 2], column
        assert [s.value for s in scalars] == pytest.approx([r[column] for r in rows], rel=1e-5), column
    assert {"val/acc", "val/loss"} <= set(events.Tags()["scalars"])
    points = {s.step: s.value for s in events.Scalars("train/running_loss")}
    assert sorted(points) == list(range(LOG_EVERY, 2 * STEPS_PER_EPOCH + 1, LOG_EVERY))
    assert mean_per_epoch(points) == pytest.approx([r["train_loss"] for r in rows], rel=1e-5)


# ------------------------------------------------------------------ the MLflow tracker on its own
def logger_cfg(**overrides):
    return OmegaConf.create({"tensorboard": False, "mlflow": True, "tracking_uri": None, "experiment_name": "units",
                             "log_model": False, "log_figures": True, **overrides})


def fake_run_dir(path: Path, status: str) -> Path:
    """A run directory as a run leaves it: run.json, metrics.csv, a plot and the weights."""
    (path / "plots").mkdir(parents=True)
    (path / "plots" / "test_acc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (path / "metrics.csv").write_text("epoch,test_acc\n1,0.25\n")
    (path / "model.pt").write_bytes(b"weights")
    record = RunRecord(path, overrides=["optim.lr=0.5"], device="cpu")
    record.finish(status, final_test_acc=0.25)
    return path


def track(tmp_path: Path, status: str, cfg) -> str:
    """Drive an MlflowTracker through one epoch and an end with `status`; its run id."""
    from cnnexp.tracking.mlflow_logger import MlflowTracker

    run_dir = fake_run_dir(tmp_path / status, status)
    tracking = Tracking([MlflowTracker("optim.lr=0.5", cfg)])
    tracking.steps_per_epoch = 10
    tracking.on_start(OmegaConf.create({"optim": {"lr": 0.5}}), run_dir, [])
    tracking.on_step(1, 10, 2.25)
    tracking.on_epoch({"epoch": 1, "train_loss": 2.0, "test_acc": 0.25})
    tracking.on_finish(status, run_dir)
    assert tracking.complete(), tracking.state
    return tracking.state["mlflow"]["run_id"]


@pytest.mark.parametrize("status, mlflow_status", [("failed", "FAILED"), ("interrupted", "KILLED"),
                                                   ("pruned", "FINISHED"), ("completed", "FINISHED")])
def test_each_end_becomes_its_mlflow_status(tmp_path, store, status, mlflow_status):
    run_id = track(tmp_path, status, logger_cfg(tracking_uri=store))
    run = mlflow.MlflowClient(tracking_uri=store).get_run(run_id)
    assert run.info.status == mlflow_status and run.data.tags["status"] == status
    assert run.data.metrics == {"train_running_loss": 2.25, "train_loss": 2.0, "test_acc": 0.25,
                                "final_test_acc": 0.25}


def test_figures_and_weights_are_uploaded_only_when_asked(tmp_path, store):
    client = mlflow.MlflowClient(tracking_uri=store)
    default = {a.path for a in client.list_artifacts(track(tmp_path / "a", "completed", logger_cfg(tracking_uri=store)))}
    assert "plots" in default and "model.pt" not in default
    quiet = track(tmp_path / "b", "completed", logger_cfg(tracking_uri=store, log_figures=False, log_model=True))
    artifacts = {a.path for a in client.list_artifacts(quiet)}
    assert "plots" not in artifacts and "model.pt" in artifacts and "metrics.csv" in artifacts


def test_the_store_falls_back_to_the_environment_then_the_current_dir(tmp_path, store, monkeypatch):
    from cnnexp.tracking.mlflow_logger import MlflowTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_id = track(tmp_path, "completed", logger_cfg())
    assert mlflow.MlflowClient(tracking_uri=store).get_run(run_id).info.experiment_id
    assert MlflowTracker("x", logger_cfg(tracking_uri="sqlite:////elsewhere.db")).tracking_uri == \
        "sqlite:////elsewhere.db"  # the config wins over the environment
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert MlflowTracker("x", logger_cfg()).tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


# ------------------------------------------------------------------ the TensorBoard tracker on its own
@pytest.mark.parametrize("log_figures", [True, False])
def test_tensorboard_adds_the_plots_as_images_only_when_asked(tmp_path, log_figures):
    from PIL import Image

    from cnnexp.tracking.tensorboard_logger import TensorBoardTracker

    (tmp_path / "plots").mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "plots" / "test_acc.png")
    tracker = TensorBoardTracker("optim.lr=0.5", log_figures=log_figures)
    state = {}
    tracker.start(OmegaConf.create({"optim": {"lr": 0.5}}), tmp_path, state, steps_per_epoch=10, epochs_done=0)
    tracker.log_step(7, 2.5)
    tracker.log_epoch({"epoch": 1, "test_acc": 0.25})
    tracker.finish("completed", tmp_path)
    events = event_accumulator.EventAccumulator(state["dir"], size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/running_loss")] == [(7, 2.5)]
    assert [(s.step, s.value) for s in events.Scalars("test/acc")] == [(1, 0.25)]
    if log_figures:
        (image,) = events.Images("plots/test_acc")
        assert (image.step, image.width, image.height) == (1, 8, 6)
    else:
        assert events.Tags()["images"] == []
