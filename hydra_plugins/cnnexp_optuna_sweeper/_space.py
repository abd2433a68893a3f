"""The search space: Hydra override grammar -> Optuna distributions.

    optim.lr=tag(log, interval(1e-4, 1e-1))   float, sampled on a log scale
    optim.momentum=interval(0.5, 0.99)        float (an int-typed key samples ints)
    data.batch_size=choice(4, 16, 64)         one of the values
    trainer.seed=range(0, 5)                  0, 1, 2, 3, 4 (stop excluded, as in Hydra)
    trainer.max_epochs=10                     fixed: the same in every trial

Every mistake is a SearchSpaceError naming the key, found before anything runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf


class SearchSpaceError(ValueError):
    """A search-space entry that cannot be searched; the message names it."""


@dataclass
class SearchSpace:
    distributions: dict[str, Any] = field(default_factory=dict)  # key -> optuna distribution
    # The job's overrides in order, with None where a searched key's value goes.
    template: list[tuple[str, str | None]] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # key -> the range as written

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The job's command-line overrides for one trial's parameter values."""
        out = []
        for key, line in self.template:
            out.append(line if line is not None else f"{key}={format_value(params[key])}")
        return out

    def grid(self) -> dict[str, list]:
        """Every value of every key, for the grid sampler (discrete spaces only)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        values = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                values[key] = list(dist.choices)
            elif isinstance(dist, (IntDistribution, FloatDistribution)) and dist.step is not None and not dist.log:
                n = int(round((dist.high - dist.low) / dist.step)) + 1
                values[key] = [type(dist.low)(dist.low + i * dist.step) for i in range(n)]
            else:
                raise SearchSpaceError(
                    f"hydra.sweeper.sampler=grid needs a value list for {key}, not a continuous interval: "
                    f"use {key}=choice(...) or {key}=range(...), or another sampler.")
        return values


_BARE = re.compile(r"^[A-Za-z_][\w\-./:]*$")


def format_value(value: Any) -> str:
    """A value as override grammar reads it back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _BARE.match(text) and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def params_from_config(params: DictConfig | dict | None) -> list[str]:
    """hydra.sweeper.params as override strings."""
    if not params:
        return []
    items = OmegaConf.to_container(params, resolve=False) if isinstance(params, DictConfig) else params
    return [f"{key}={value}" for key, value in items.items()]


def parse(arguments: list[str], job_config: DictConfig) -> SearchSpace:
    """The search space from override strings (config params first, then the
    command line; a later entry for the same key replaces an earlier one)."""
    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
    except HydraException as err:
        raise SearchSpaceError(str(err).splitlines()[0]) from None
    by_key: dict[str, Override] = {}
    for override in parsed:
        by_key.pop(override.key_or_group, None)  # keep the later one, in its place
        by_key[override.key_or_group] = override
    space = SearchSpace()
    for key, override in by_key.items():
        if override.is_sweep_override():
            space.distributions[key] = _distribution(key, override, job_config)
            space.sources[key] = (override.input_line or "").partition("=")[2]
            space.template.append((key, None))
        else:
            space.template.append((key, override.input_line))
    return space


def _distribution(key: str, override: Override, job_config: DictConfig):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = override.input_line or key
    if override.is_hydra_override():
        raise SearchSpaceError(f"{where}: Hydra's own settings cannot be searched.")
    if override.is_choice_sweep() or (override.is_range_sweep() and override.value().shuffle):
        values = list(override.sweep_iterator())
        if not values:
            raise SearchSpaceError(f"{where}: a choice needs at least one value.")
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise SearchSpaceError(f"{where}: choices must be numbers, strings or booleans, not {v!r}.")
        return CategoricalDistribution(values)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        step = override.value().step
        if not values:
            raise SearchSpaceError(f"{where}: the range is empty (its stop is excluded, as in Python).")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(step))
    if override.is_interval_sweep():
        interval = override.value()
        low, high, log = float(interval.start), float(interval.end), "log" in interval.tags
        unknown = set(interval.tags) - {"log"}
        if unknown:
            raise SearchSpaceError(f"{where}: unknown tag {sorted(unknown)[0]!r}; the only tag is 'log'.")
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise SearchSpaceError(f"{where}: an interval needs low < high (got low {low:g}, high {high:g}).")
        if log and low <= 0:
            raise SearchSpaceError(f"{where}: a log interval needs low > 0 (got {low:g}).")
        if _is_int_key(job_config, key):
            if low != int(low) or high != int(high):
                raise SearchSpaceError(f"{where}: {key} is an integer, so the interval's ends must be integers.")
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(low, high, log=log)
    raise SearchSpaceError(f"{where}: use interval(), tag(log, interval()), choice() or range().")


def _is_int_key(job_config: DictConfig, key: str) -> bool:
    """interval(1, 5) reaches us as floats; the config's own value says whether the key holds ints."""
    try:
        value = OmegaConf.select(job_config, key, default=None, throw_on_missing=False)
    except Exception:
        return False
    return isinstance(value, int) and not isinstance(value, bool)


def describe(dist) -> str:
    """A distribution as the override grammar writes it (for messages)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return f"choice({', '.join(format_value(c) for c in dist.choices)})"
    stepped = dist.step is not None and (isinstance(dist.low, float) or dist.step != 1)
    if stepped:  # range() excludes its stop
        return f"range({format_value(dist.low)}, {format_value(dist.high + dist.step)}, {format_value(dist.step)})"
    text = f"interval({format_value(dist.low)}, {format_value(dist.high)})"
    return f"tag(log, {text})" if dist.log else text


def contains(dist, value: Any) -> bool:
    """Whether a trial may take `value` for this distribution (an enqueued one, say)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not dist.low <= value <= dist.high:
        return False
    if dist.step:
        steps = (value - dist.low) / dist.step
        return math.isclose(steps, round(steps), abs_tol=1e-9)
    return True


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """How two search spaces (key -> distribution) differ, in words; [] when they are the same."""
    found = [f"{k} is no longer searched (was {describe(before[k])})" for k in before if k not in after]
    found += [f"{k} is new ({describe(after[k])})" for k in after if k not in before]
    found += [f"{k} was {describe(before[k])}, now {describe(after[k])}" for k in after
              if k in before and before[k] != after[k]]
    return found
