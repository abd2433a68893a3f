"""A sweep or search stops before its first job when one of its jobs would
carry a key nothing reads, or one its `_target_` does not take: otherwise
each job would fail alone, one after another.

This callback is built in every command's process, a sweep's parent included,
which otherwise never imports torch: checking a `_target_` imports its module
(and torch with it), so in a joblib sweep the check runs in a warm worker
(cnnexp/warm_pool.py), which has imported torch already.
"""

from __future__ import annotations

import itertools
import sys

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnnexp import warm_pool
from cnnexp.errors import ConfigError


class SweepKeysCheck(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            warm_pool.call(check_job_configs, list(sweep_job_configs(config)))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None


def check_job_configs(configs: list[DictConfig]) -> None:
    """The checks of each job's keys; a ConfigError names the first problem."""
    from cnnexp.config.checks import check_unknown_keys
    from cnnexp.config.targets import check_all_targets

    for job_cfg in configs:
        check_unknown_keys(job_cfg)
        check_all_targets(job_cfg)  # the keys a `_target_` is given, against its signature


MAX_GROUP_COMBINATIONS = 64  # composing a config costs ~20 ms; a sweep rarely crosses more options


def sweep_job_configs(config: DictConfig):
    """The configs a sweep's jobs can have, as far as their keys go.

    Which keys a job has depends on its group options and on the keys its
    overrides add (`+key=...`), not on the values of keys the schema has. So
    one config per combination of swept group options is composed, and each
    added key, swept or a search range, is added to it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = list(config.hydra.overrides.task)
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)  # a search space in the config
    if isinstance(params, DictConfig):
        lines = [f"{k}={v}" for k, v in OmegaConf.to_container(params, resolve=False).items()] + lines
    groups = set(OmegaConf.select(config, "hydra.runtime.choices", default={}) or {})
    fixed, swept_groups, added = [], [], []
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_hydra_override() or not override.is_sweep_override():
            fixed.append(override.input_line)
        elif override.key_or_group in groups and override.is_choice_sweep():
            swept_groups.append([f"{override.key_or_group}={v}" for v in override.sweep_string_iterator()])
        elif override.is_add() or override.is_force_add():
            added.append(override.key_or_group)
    if not swept_groups:
        cfgs = [_without_hydra(config)]
    else:
        loader = _config_loader()
        combos = list(itertools.islice(itertools.product(*swept_groups), MAX_GROUP_COMBINATIONS))
        cfgs = []
        for combo in combos:
            try:
                cfgs.append(_without_hydra(loader.load_sweep_config(config, [*fixed, *combo])))
            except HydraException:  # the sweeper reports a job that does not compose, in its own words
                continue
    for cfg in cfgs:
        for key in added:
            OmegaConf.update(cfg, key, None, force_add=True)
        yield cfg


def _without_hydra(config: DictConfig) -> DictConfig:
    cfg = config.copy()
    with_flags = OmegaConf.is_struct(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    OmegaConf.set_struct(cfg, with_flags)
    return cfg


def _config_loader():
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().hydra.config_loader
