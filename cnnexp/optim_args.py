"""Which optimiser settings reach the optimiser named by `optim._target_`.

A group option (conf/optim/sgd.yaml) holds the keys of its own optimiser, so
`optim._target_=torch.optim.RMSprop` arrives with SGD's `nesterov`. A key the
optimiser does not take is left out when it is one of the group's own keys at
the group's value; set on the command line (`optim.nesterov=true`) or added
(`+optim.amsgrad=true`) it reaches the `_target_` checks (cnnexp/targets.py),
which refuse it: asking RMSprop for Nesterov momentum is a mistake to name.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from cnnexp.errors import ConfigError

log = logging.getLogger("cnnexp")
HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}


def optimizer_factory(optim_cfg: DictConfig):
    """The class (or function) `_target_` names, or None when it cannot be imported
    (the `_target_` checks report that)."""
    try:
        return get_object(str(optim_cfg._target_))
    except Exception:
        return None


def accepted_keys(factory) -> set[str] | None:
    """Keyword arguments the optimiser takes besides the parameters; None: any."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def group_defaults(optim_cfg: DictConfig) -> dict:
    """The group option's own keys and values, from its schema (cnnexp/schema.py)."""
    schema = OmegaConf.get_type(optim_cfg)
    if not dataclasses.is_dataclass(schema):
        return {}
    defaults = {}
    for field in dataclasses.fields(schema):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def optimizer_config(optim_cfg: DictConfig, quiet: bool = False) -> DictConfig:
    """optim_cfg without the group's keys (at the group's values) that its optimiser does not take."""
    accepted = accepted_keys(optimizer_factory(optim_cfg))
    if accepted is None:
        return optim_cfg
    defaults = group_defaults(optim_cfg)
    values = OmegaConf.to_container(optim_cfg, resolve=True)
    dropped = [k for k, v in values.items()
               if k not in HYDRA_KEYS and k not in accepted and k in defaults and v == defaults[k]]
    if not dropped:
        return optim_cfg
    if not quiet:
        log.info("%s takes no %s; left out of its arguments.", optim_cfg._target_, ", ".join(dropped))
    return OmegaConf.create({k: v for k, v in values.items() if k not in dropped})


def check_optimizer(optim_cfg: DictConfig) -> None:
    """Build the optimiser once over a dummy parameter, before any work, so values
    it refuses itself (SGD: Nesterov needs momentum) are a config error, not a traceback."""
    factory = optimizer_factory(optim_cfg)
    if factory is None:
        return
    kwargs = {k: v for k, v in OmegaConf.to_container(optimizer_config(optim_cfg, quiet=True), resolve=True).items()
              if k not in HYDRA_KEYS}
    if _needs_closure(factory):
        raise ConfigError(f"optim._target_={optim_cfg._target_} needs a closure that recomputes the loss at every "
                          "step, which a training step here does not give; choose another optimiser.")
    try:
        factory([torch.zeros(1, requires_grad=True)], **kwargs)
    except (TypeError, ValueError) as err:
        settings = " ".join(f"optim.{k}={v}" for k, v in kwargs.items())
        raise ConfigError(f"{optim_cfg._target_} refuses {settings}: {str(err).splitlines()[0]}") from None


def _needs_closure(factory) -> bool:
    """An optimiser such as LBFGS, whose step() cannot run without a closure."""
    try:
        closure = inspect.signature(factory.step).parameters.get("closure")
    except (AttributeError, TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty
