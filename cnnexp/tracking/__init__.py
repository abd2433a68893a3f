"""Live tracking: TensorBoard and MLflow follow a run while it trains.

`logger=tensorboard`, `logger=mlflow` or `logger=all` switch them on
(conf/logger/). Each tracker is a small class behind one interface
(cnnexp/tracking/base.py); the Tracking observer runs them and keeps their
failures away from training: metrics.csv stays the record, a tracker that
breaks is switched off with one warning, and run.json says what is missing.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cnnexp.errors import ConfigError
from cnnexp.tracking.base import Tracker, Tracking
from cnnexp.tracking.names import run_label

__all__ = ["Tracker", "Tracking", "build_tracking"]

INSTALL_HINTS = {"tensorboard": 'pip install "cnnexp[tensorboard]"', "mlflow": 'pip install "cnnexp[mlflow]"'}


def build_tracking(cfg: DictConfig, run_dir: Path, overrides: list[str], multirun: bool,
                   previous: dict | None = None) -> Tracking | None:
    """The Tracking observer for this run's logger config, or None when it asks for none.

    Runs before any work: a tracker whose package is missing is a ConfigError
    naming the extra to install. `previous` is the run.json of the run being
    resumed; its tracking state (the MLflow run id, ...) carries over."""
    logger = cfg.get("logger")
    if logger is None or not (logger.tensorboard or logger.mlflow):
        if logger is not None and logger.tracking_uri:
            raise ConfigError(f"logger.tracking_uri={logger.tracking_uri!r} is set but MLflow logging is off; "
                              "add logger=mlflow (or logger=all).")
        return None
    sweep_dir = Path(run_dir).parent if multirun else None
    if previous and previous.get("overrides") is not None:  # a resumed run keeps its name
        overrides = previous["overrides"]
    label = run_label(overrides, sweep_dir)
    trackers: list[Tracker] = []
    if logger.tensorboard:
        _require("tensorboard", "torch.utils.tensorboard")
        from cnnexp.tracking.tensorboard_logger import TensorBoardTracker

        trackers.append(TensorBoardTracker(label, log_figures=logger.log_figures))
    if logger.mlflow:
        _require("mlflow", "mlflow")
        from cnnexp.tracking.mlflow_logger import MlflowTracker

        trackers.append(MlflowTracker(label, logger, sweep_dir=sweep_dir))
    return Tracking(trackers, previous=(previous or {}).get("tracking"))


def _require(name: str, module: str) -> None:
    try:
        __import__(module)
    except ImportError as err:
        raise ConfigError(missing_package(name, str(err))) from None


def missing_package(name: str, detail: str) -> str:
    return (f"logger={name} needs the {name} package, which cannot be imported ({detail}); "
            f"install it with: {INSTALL_HINTS[name]}")
