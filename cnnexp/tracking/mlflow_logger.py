"""MLflow: one MLflow run per cnnexp run, in any store MLflow accepts.

The store is logger.tracking_uri, else $MLFLOW_TRACKING_URI, else
sqlite:///<current dir>/mlflow.db (MLflow's own default file, made absolute so
every job of a sweep writes to the same one); the end of every run says which
store and run it went to. The run is named by `name=` (else by its overrides),
each of `tags=[...]` is a tag and `notes=` its description; params are the
flattened config; metrics are logged per epoch with the epoch as the step; tags
name the status, device, versions, run dir and MLflow's standard source tags
(command, git commit, user); at the end the CSVs, the config and the plots (and
model.pt with logger.log_model=true) become artifacts. A sweep's jobs are
children of one parent run per sweep dir, named by the sweep's `name=`, and
carry its path as the tag cnnexp.sweep_dir.

A tracking server that goes away must not hold the run up: unless the user set
them, HTTP calls get a 10 s timeout and 2 quick retries, and the first failure
switches MLflow off for the rest of the run (see cnnexp/tracking/base.py).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags
from omegaconf import DictConfig

from cnnexp.results.files import (
    BEST_MODEL_FILE,
    CONFUSION_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PER_CLASS_FILE,
    RUN_RECORD,
)
from cnnexp.results.record import read_record
from cnnexp.safeio import write_text

try:
    import fcntl
except ImportError:  # Windows: no lock; start parallel jobs on a store that exists already
    fcntl = None
from cnnexp.tracking.base import Tracker
from cnnexp.tracking.names import flat_config, numeric_columns, sweep_identity

log = logging.getLogger("cnnexp")

HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}  # others: FINISHED
ARTIFACTS = (METRICS_FILE, PER_CLASS_FILE, CONFUSION_FILE, RUN_RECORD)
PARENT_FILE = "mlflow_parent.json"
# run.json fields logged once at the end, as the run's summary metrics.
SUMMARY_PREFIXES = ("best_", "final_", "objective_value", "test_acc_at_best")
BATCH = 100  # MLflow's limit of params per log_batch call


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, label: str, logger_cfg: DictConfig, sweep_dir: Path | None = None):
        self.label, self.sweep_dir = label, sweep_dir
        self.tracking_uri = logger_cfg.tracking_uri or default_tracking_uri()
        self.experiment_name = logger_cfg.experiment_name
        self.log_model, self.log_figures = logger_cfg.log_model, logger_cfg.log_figures
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.run_name = label
        self.present: set[int] = set()  # epochs the MLflow run already holds (a resumed run)

    def start(self, cfg: DictConfig, run_dir: Path, state: dict, steps_per_epoch: int | None,
              epochs_done: int) -> None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        with sqlite_lock(self.tracking_uri):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)  # creates a new store's tables
            self._open_run(cfg, run_dir, state)

    def _open_run(self, cfg: DictConfig, run_dir: Path, state: dict) -> None:
        record = read_record(run_dir) or {}
        self.run_name = record.get("name") or self.label
        if state.get("run_id") and state.get("tracking_uri") == self.tracking_uri:
            self.run_id = state["run_id"]  # a resumed run continues its MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_params(cfg, skip=set(self.client.get_run(self.run_id).data.params))
            self.present = {m.step for m in self.client.get_metric_history(self.run_id, "test_acc")}
        else:
            experiment_id = self._experiment_id()
            tags = {"cnnexp.run_dir": str(Path(run_dir).resolve()), "cnnexp.overrides": " ".join(record.get("overrides") or []),
                    **identity_tags(record)}
            if self.sweep_dir is not None:
                tags["cnnexp.sweep_dir"] = str(self.sweep_dir.resolve())
                parent = self._parent_run(experiment_id)
                if parent:
                    tags["mlflow.parentRunId"] = parent
                    self.client.update_run(parent, status="RUNNING")
            run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            state.update(run_id=self.run_id, experiment_id=experiment_id, tracking_uri=self.tracking_uri,
                         experiment_name=self.experiment_name)
            self._log_params(cfg, skip=set())
        self._set_tags({"status": "running", "device": str(record.get("device", "")),
                        "device_name": str(record.get("device_name", "")),
                        **{f"version.{k}": str(v) for k, v in (record.get("versions") or {}).items()},
                        **source_tags(record)})

    # ------------------------------------------------------------ per step / epoch
    def log_step(self, global_step: int, running_loss: float) -> None:
        self.client.log_metric(self.run_id, "train_running_loss", running_loss, step=global_step)

    def log_epoch(self, row: dict) -> None:
        if row["epoch"] in self.present:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(row["epoch"])) for k, v in numeric_columns(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, status: str, run_dir: Path) -> None:
        record = read_record(run_dir) or {}
        summary = {k: float(v) for k, v in record.items()
                   if k.startswith(SUMMARY_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in summary.items()])
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for name in ("config.yaml", "overrides.yaml"):
            if (run_dir / ".hydra" / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / ".hydra" / name), "config")
        if self.log_figures and (run_dir / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "plots"), "plots")
        for weights in (MODEL_FILE, BEST_MODEL_FILE) if self.log_model else ():
            if (run_dir / weights).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / weights))
        self._set_tags({"status": status})
        self.client.set_terminated(self.run_id, STATUS.get(status, "FINISHED"))
        self._end_parent()
        # Which store a run went to is easy to lose (the default is mlflow.db in the current directory).
        log.info("MLflow: run %r (id %s) is in experiment %r of the store %s; open it with: "
                 "mlflow ui --backend-store-uri %s", self.run_name, self.run_id, self.experiment_name,
                 self.tracking_uri, self.tracking_uri)

    # ------------------------------------------------------------ helpers
    def _set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _log_params(self, cfg: DictConfig, skip: set[str]) -> None:
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(cfg).items() if k not in skip]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            # The kind makes the MLflow UI open the experiment on its runs table, not the GenAI views.
            return self.client.create_experiment(self.experiment_name,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:  # a parallel job created it first
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _parent_run(self, experiment_id: str) -> str | None:
        """The sweep's parent run: the first job creates it, the others find its id in the sweep dir."""
        path = self.sweep_dir / PARENT_FILE
        key = {"tracking_uri": self.tracking_uri, "experiment_id": experiment_id}
        try:
            fd = os.open(self.sweep_dir / f".{PARENT_FILE}.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another job creates it; wait for its id
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                saved = _read_json(path)
                if saved is not None:
                    return saved.get("run_id") if all(saved.get(k) == v for k, v in key.items()) else None
                time.sleep(0.2)
            return None
        os.close(fd)
        run_id = None
        try:
            sweep = sweep_identity(self.sweep_dir)
            run = self.client.create_run(experiment_id, run_name=sweep["name"],
                                         tags={"cnnexp.sweep_dir": str(self.sweep_dir.resolve()),
                                               **identity_tags(sweep)})
            run_id = run.info.run_id
        finally:
            write_text(path, json.dumps({**key, "run_id": run_id}) + "\n")  # no temp file left on failure
        return run_id

    def _end_parent(self) -> None:
        """Mark the sweep's parent run finished as of this job's end (the last job's end sticks)."""
        parent = self.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
        if parent:
            self.client.set_terminated(parent, "FINISHED")


def identity_tags(record: dict) -> dict[str, str]:
    """A run's tags=[...] as MLflow tags (each its own key, to filter by: tags.baseline = 'true'),
    all of them as cnnexp.tags, and notes= as the run's description."""
    tags = [str(t) for t in record.get("tags") or []]
    out = {**{re.sub(r"[^\w.\- /]", "_", t): "true" for t in tags}, "cnnexp.tags": ",".join(tags)}
    if record.get("notes"):
        out[mlflow_tags.MLFLOW_RUN_NOTE] = str(record["notes"])
    return out


def source_tags(record: dict) -> dict[str, str]:
    """MLflow's standard source tags, from run.json's reproduction record (the command
    line, and the commit of the working directory's repository)."""
    reproduction = record.get("reproduction") or {}
    repo = (reproduction.get("git") or {}).get("working_dir") or {}
    tags = {mlflow_tags.MLFLOW_SOURCE_TYPE: "LOCAL",
            mlflow_tags.MLFLOW_SOURCE_NAME: reproduction.get("command_line") or str(record.get("command") or "cnnexp")}
    try:
        tags[mlflow_tags.MLFLOW_USER] = getpass.getuser()
    except (KeyError, OSError):  # no user name in a container without a passwd entry
        pass
    if repo.get("commit"):
        tags[mlflow_tags.MLFLOW_GIT_COMMIT] = repo["commit"]
        tags[mlflow_tags.MLFLOW_GIT_DIRTY] = str(bool(repo.get("dirty"))).lower()
    return {k: v[:5000] for k, v in tags.items()}


@contextmanager
def sqlite_lock(tracking_uri: str):
    """Parallel jobs open a SQLite store one at a time: a new database's tables are
    created on first use, and two processes creating them at once corrupt the schema."""
    if not tracking_uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    # flock on the database file itself: SQLite's own locks are fcntl locks, which flock does not touch.
    with open(path, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
