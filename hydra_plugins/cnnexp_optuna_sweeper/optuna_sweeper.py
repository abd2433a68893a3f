"""The Hydra sweeper plugin: `cnnexp -m hydra/sweeper=optuna [search space]`.

This module stays light (Hydra imports it while scanning for plugins on every
cnnexp command); Optuna is imported only when a search runs, in _search.py.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class CnnexpOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> Any:
        from cnnexp.errors import CnnexpError

        from ._search import Search

        try:
            search = Search.prepare(self.settings, self.config, list(arguments), self)
            return search.run()
        except CnnexpError as err:  # bad input (exit 2, nothing trained), a study locked for too long (exit 1)
            print(f"cnnexp: error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
