"""A sweep stops before its first job when its logger needs a package that is missing.

Each job checks by importing the package (cnnexp/tracking/__init__.py); here,
in the launcher's process, finding it is enough, so a sweep does not pay for
MLflow's import twice.
"""

from __future__ import annotations

import importlib.util
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class TrackerPackageCheck(Callback):
    """Hydra builds it for every command; it imports nothing until a sweep starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from cnnexp.tracking import missing_package

        logger = config.get("logger")
        if logger is None:
            return
        for name in ("tensorboard", "mlflow"):
            if logger.get(name) and not _findable(name):
                print(f"error: {missing_package(name, f'No module named {name!r}')}", file=sys.stderr)
                raise SystemExit(2)


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
