"""Live tracking: what TensorBoard and MLflow hold after real runs, read back with their own readers.

The CLI runs in subprocesses, as a user runs it; runs are shared between
assertions (module-scoped fixtures) because MLflow's import and a fresh
database cost seconds each.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from cnnexp.errors import ConfigError
from cnnexp.observers import Observers
from cnnexp.results.record import RunRecord
from cnnexp.tracking import Tracker, Tracking, build_tracking
from cnnexp.tracking.names import run_label
from cnnexp.tracking.tensorboard_logger import scalar_tag
from conftest import SMALL, run_cli, start_cli, wait_for_rows

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

# 400 images at batch 4: 100 steps per epoch; the running loss is reported at steps 40 and 80.
RUN = [*SMALL, "trainer.log_every_steps=40", "trainer.device=cpu"]
NO_ENV_URI = {"MLFLOW_TRACKING_URI": ""}
EPOCH_TAGS = ["train/loss", "train/acc", "test/loss", "test/acc", "lr", "train/samples_per_s", "epoch_seconds"]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def read_tensorboard(run_dir: Path):
    """The EventAccumulator of the run's one TensorBoard run directory."""
    (log_dir,) = (run_dir / "tensorboard").iterdir()
    events = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0,
                                                                              "tensors": 0})
    events.Reload()
    return log_dir, events


def client_for(cwd: Path):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def steps(history) -> list[int]:
    return sorted(m.step for m in history)


# ------------------------------------------------------------------ a 2-job sweep with both trackers
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["-m", *RUN, "trainer.max_epochs=2", "optim.lr=0.01,0.02", "logger=all",
                    "hydra.sweep.dir=sweep"], cwd, env=NO_ENV_URI)
    assert proc.returncode == 0, proc.stderr
    return cwd, [cwd / "sweep" / "0", cwd / "sweep" / "1"]


@pytest.mark.slow
def test_tensorboard_holds_every_scalar_for_every_epoch_of_each_job(sweep):
    _, jobs = sweep
    for job, lr in zip(jobs, ("0.01", "0.02")):
        log_dir, events = read_tensorboard(job)
        assert log_dir.name == f"optim.lr={lr}"  # named by the swept value alone
        rows = read_metrics(job)
        for tag in EPOCH_TAGS:
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [1, 2], tag
            column = tag.replace("/", "_")
            assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows], rel=1e-5)
        assert [s.step for s in events.Scalars("train/running_loss")] == [40, 80, 140, 180]
        assert {"plots/overview", "plots/test_acc"} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_tensorboard_hparams_name_the_config_and_the_metrics_to_compare(sweep):
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, jobs = sweep
    for job, lr in zip(jobs, (0.01, 0.02)):
        _, events = read_tensorboard(job)
        content = events.PluginTagToContent("hparams")
        data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
        start = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
        assert start.hparams["optim.lr"].number_value == pytest.approx(lr)
        assert start.hparams["data.name"].string_value == "synthetic"
        experiment = next(d.experiment for d in data.values() if d.HasField("experiment"))
        assert {"test/acc", "train/loss"} <= {m.name.tag for m in experiment.metric_infos}


@pytest.mark.slow
def test_mlflow_run_per_job_with_params_metrics_artifacts_and_tags(sweep):
    cwd, jobs = sweep
    client = client_for(cwd)
    experiment = client.get_experiment_by_name("cnnexp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"optim.lr=0.01", "optim.lr=0.02"} <= set(runs)
    for job, lr in zip(jobs, ("0.01", "0.02")):
        run = runs[f"optim.lr={lr}"]
        record = json.loads((job / "run.json").read_text())
        assert record["tracking"]["mlflow"]["run_id"] == run.info.run_id
        assert record["tracking"]["complete"] is True
        assert run.info.status == "FINISHED"
        assert run.data.params["optim.lr"] == lr
        assert run.data.params["trainer.max_epochs"] == "2"
        assert run.data.params["model._target_"] == "cnnexp.models.TutorialCNN"
        rows = read_metrics(job)
        for key in ("train_loss", "test_acc", "lr", "train_samples_per_s"):
            history = client.get_metric_history(run.info.run_id, key)
            assert steps(history) == [1, 2], key
            by_step = {m.step: m.value for m in history}
            assert [by_step[1], by_step[2]] == pytest.approx([float(r[key]) for r in rows], rel=1e-6)
        assert steps(client.get_metric_history(run.info.run_id, "train_running_loss")) == [40, 80, 140, 180]
        tags = run.data.tags
        assert tags["status"] == "completed"
        assert tags["device"] == "cpu"
        assert tags["version.torch"] == torch.__version__ == record["versions"]["torch"]
        assert tags["cnnexp.overrides"] == " ".join(record["overrides"])
        assert Path(tags["cnnexp.run_dir"]) == job.resolve()
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.csv", "per_class.csv", "plots", "config"} <= artifacts
        assert "plots/overview.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert "config/config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "config")}


@pytest.mark.slow
def test_mlflow_groups_a_sweeps_jobs_under_one_parent_run(sweep):
    cwd, _ = sweep
    client = client_for(cwd)
    experiment = client.get_experiment_by_name("cnnexp")
    sweep_dir = str((cwd / "sweep").resolve())
    jobs = client.search_runs([experiment.experiment_id], f"tags.`cnnexp.sweep_dir` = '{sweep_dir}'")
    parents = {r.data.tags.get("mlflow.parentRunId") for r in jobs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    children = [r for r in jobs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["optim.lr=0.01", "optim.lr=0.02"]
    assert parent.info.status == "FINISHED"


# ------------------------------------------------------------------ resume
@pytest.mark.slow
def test_a_resumed_run_continues_the_same_stores_with_one_value_per_epoch(tmp_path):
    # Killed hard after its second epoch, so the stores may or may not hold that epoch already.
    proc = start_cli([*RUN, "data.n_train=800", "trainer.max_epochs=30", "logger=all", "hydra.run.dir=run"],
                     tmp_path, env=NO_ENV_URI)
    run_dir = tmp_path / "run"
    wait_for_rows(run_dir / "metrics.csv", 2, proc, timeout=600)
    proc.kill()
    proc.communicate()
    first = json.loads((run_dir / "run.json").read_text())["tracking"]
    done = run_cli(["trainer.resume=run", "trainer.max_epochs=4"], tmp_path, env=NO_ENV_URI)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["tracking"]["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert record["tracking"]["complete"] is True

    _, events = read_tensorboard(run_dir)
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # the same TensorBoard directory
    for tag in ("test/acc", "train/loss", "lr"):
        assert [s.step for s in events.Scalars(tag)] == [1, 2, 3, 4], tag
    assert [s.value for s in events.Scalars("test/acc")] == pytest.approx([float(r["test_acc"]) for r in rows])
    running = [s.step for s in events.Scalars("train/running_loss")]
    assert running == sorted(set(running))  # a retrained epoch's points replace the old ones

    client = client_for(tmp_path)
    run = client.get_run(first["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second MLflow run
    for key in ("test_acc", "train_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert steps(history) == [1, 2, 3, 4], key
        assert sorted(history, key=lambda m: m.step)[-1].value == pytest.approx(float(rows[-1][key]))


# ------------------------------------------------------------------ a tracking server that goes away
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "the mlflow server did not start"
        time.sleep(0.5)
    yield url, server
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.slow
def test_logging_over_http_and_a_server_killed_mid_run(tmp_path, mlflow_server):
    url, server = mlflow_server
    proc = start_cli([*RUN, "trainer.max_epochs=5", "logger=mlflow", f"logger.tracking_uri={url}",
                      "hydra.run.dir=run"], tmp_path)
    run_dir = tmp_path / "run"
    wait_for_rows(run_dir / "metrics.csv", 2, proc, timeout=600)
    proc.send_signal(signal.SIGSTOP)  # hold the run still while the server is checked and killed
    try:
        run_id = json.loads((run_dir / "run.json").read_text())["tracking"]["mlflow"]["run_id"]
        client = mlflow.MlflowClient(tracking_uri=url)
        first = read_metrics(run_dir)[0]
        for key in first:  # every value of epoch 1 arrived over HTTP
            if key != "epoch":
                history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
                assert history[1] == pytest.approx(float(first[key])), key
        assert client.get_run(run_id).data.params["trainer.max_epochs"] == "5"
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    finally:
        proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["tracking"]["complete"] is False
    mlflow_state = record["tracking"]["mlflow"]
    assert mlflow_state["ok"] is False
    assert re.fullmatch(r"\w+(Error|Exception): .+", mlflow_state["error"]), mlflow_state["error"]
    # Stopped after epoch 2's row was written: epoch 2 reached the server, or its logging failed.
    assert mlflow_state["last_epoch"] in (1, 2)
    assert f"mlflow logging stopped ({mlflow_state['error']}" in stderr
    assert stderr.count("mlflow logging stopped") == 1  # one warning, not one per epoch


# ------------------------------------------------------------------ a missing package
BLOCK_IMPORT = """
import importlib.abc, runpy, sys
blocked = sys.argv[1]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
sys.argv = ["cnnexp", *sys.argv[2:]]
runpy.run_module("cnnexp", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("package, args", [("mlflow", ["logger=mlflow"]), ("tensorboard", ["logger=tensorboard"]),
                                           ("mlflow", ["-m", "logger=all", "optim.lr=0.01,0.02"])])
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, package, args):
    proc = subprocess.run([sys.executable, "-c", BLOCK_IMPORT, package, *args, *SMALL, "hydra.run.dir=run",
                           "hydra.sweep.dir=run"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert f'pip install "cnnexp[{package}]"' in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("metrics.csv"))  # no work was done, by any job


# ------------------------------------------------------------------ failures, names, config (in process)
class Broken(Tracker):
    """A tracker whose tool fails from the second epoch on."""

    name = "broken"

    def __init__(self):
        self.epochs = []

    def log_epoch(self, row):
        if row["epoch"] >= 2:
            raise OSError("No space left on device")
        self.epochs.append(row["epoch"])


def test_a_failing_tracker_is_switched_off_with_one_warning_and_noted(tmp_path, caplog):
    record = RunRecord(tmp_path)
    broken = Broken()
    observers = Observers([Tracking([broken]).bind(record)])
    observers.steps_per_epoch = 10
    observers.on_start(None, tmp_path, [])
    for epoch in (1, 2, 3, 4):
        observers.on_epoch({"epoch": epoch, "test_acc": 0.5})
    observers.on_finish("completed", tmp_path)
    assert broken.epochs == [1]
    assert len([r for r in caplog.records if "broken logging stopped" in r.getMessage()]) == 1
    saved = json.loads((tmp_path / "run.json").read_text())["tracking"]
    assert saved["complete"] is False
    assert saved["broken"] == {"ok": False, "last_epoch": 1, "error": "OSError: No space left on device"}


def test_a_resumed_tracker_fills_in_the_epochs_it_missed(tmp_path):
    broken = Broken()
    tracking = Tracking([broken], previous={"broken": {"ok": False, "last_epoch": 0}})
    tracking.on_start(None, tmp_path, [{"epoch": 1}])
    assert broken.epochs == [1]
    assert tracking.state["broken"]["ok"] is True


def test_run_label_names_a_run_by_its_overrides(tmp_path):
    assert run_label([]) == "defaults"
    assert run_label(["optim.lr=0.01", "logger=all", "hydra.run.dir=x"]) == "optim.lr=0.01"
    assert "/" not in run_label(["data.root=/data/pets"])
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - data=synthetic\n    - optim.lr=0.01,0.02\n    - trainer.seed=range(2)\n")
    assert run_label(["data=synthetic", "optim.lr=0.02", "trainer.seed=1"], tmp_path) == "optim.lr=0.02,trainer.seed=1"
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - data=synthetic\n")
    (tmp_path / "search.yaml").write_text("params:\n  optim.lr: tag(log, interval(1e-4, 1e-1))\n")
    assert run_label(["data=synthetic", "optim.lr=0.00123"], tmp_path) == "optim.lr=0.00123"  # a search's trial


def test_metrics_columns_become_grouped_tensorboard_tags():
    assert [scalar_tag(c) for c in ("train_loss", "val_acc", "test_acc", "lr", "train_samples_per_s")] == [
        "train/loss", "val/acc", "test/acc", "lr", "train/samples_per_s"]


def test_no_logger_means_no_tracking_and_a_uri_without_mlflow_is_refused(compose_cfg, tmp_path):
    assert build_tracking(compose_cfg(SMALL), tmp_path, [], multirun=False) is None
    with pytest.raises(ConfigError, match="logger=mlflow"):
        build_tracking(compose_cfg([*SMALL, "logger.tracking_uri=http://127.0.0.1:5000"]), tmp_path, [], False)


def test_logger_choices_compose(compose_cfg):
    for choice, expected in (("none", (False, False)), ("tensorboard", (True, False)), ("mlflow", (False, True)),
                             ("all", (True, True)), ("[tensorboard,mlflow]", (True, True))):
        logger = compose_cfg([f"logger={choice}"]).logger
        assert (logger.tensorboard, logger.mlflow) == expected, choice
