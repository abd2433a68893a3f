"""`_target_` entries checked before any work: importable, callable, and
accepting the keys the config gives them.

Hydra only finds out that `model._target_=nosuch.Model` is wrong when it
instantiates the model, after the data has been read, and then says so in
three chained tracebacks. These checks run with the other config checks and
raise one ConfigError naming the key, the value and what is wrong.

Any config group with `_target_` entries can use them: `check_target` for one
node, `check_all_targets` for every node in a config. The second half of the
module decides which optim.* keys reach the optimiser (`optimizer_config`)
and builds it once over a dummy parameter (`check_optimizer`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Iterable

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnexp.errors import ConfigError

log = logging.getLogger("cnnexp")

# Keys Hydra's instantiate reads itself; they are not passed to the target.
HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}

# What cnnexp passes besides the config's own keys, per top-level group.
SUPPLIED = {
    "model": ("in_channels", "num_classes"),  # from the dataset
    "optim": ("params",),  # the model's parameters, bound by the trainer
}


def locate(key: str, path) -> object:
    """The object a dotted path names, or a ConfigError saying why it cannot be had."""
    where = f"{key}={path!r}"
    if not isinstance(path, str) or not path or not all(p.isidentifier() for p in path.split(".")):
        raise ConfigError(f"{where} is not a dotted Python name such as mypackage.MyClass.")
    parts = path.split(".")
    obj = _import(where, parts[0])
    if obj is None:
        raise ConfigError(f"{where} cannot be imported: there is no module named {parts[0]!r} "
                          "(is it installed, or its folder on PYTHONPATH?).")
    for i in range(1, len(parts)):
        if hasattr(obj, parts[i]):
            obj = getattr(obj, parts[i])
            continue
        owner = ".".join(parts[:i])
        obj = _import(where, f"{owner}.{parts[i]}") if inspect.ismodule(obj) else None
        if obj is None:
            raise ConfigError(f"{where} cannot be found: {owner} has no attribute {parts[i]!r}.")
    return obj


def _import(where: str, name: str):
    """The module `name`, None if there is none, or a ConfigError if importing it fails."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            return None
        raise ConfigError(f"{where} cannot be imported: module {name} needs {err.name!r}, "
                          "which is not installed.") from None
    except Exception as err:  # the module exists but fails while importing
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{where} cannot be imported: importing {name} raised "
                          f"{type(err).__name__}: {first}") from None


def check_target(node: DictConfig, key: str, supplied: Iterable[str] = (), complete: bool = False) -> object:
    """Check the `_target_` of `node` (found at `key`, e.g. "model") and return it.

    `supplied` names the arguments the caller passes besides the node's keys.
    With complete=True, a required parameter that nobody passes is an error too
    (use it where the caller passes everything it will ever pass)."""
    target_key = f"{key}._target_" if key else "_target_"
    target = locate(target_key, node.get("_target_"))
    if not callable(target):
        raise ConfigError(f"{target_key}={node._target_!r} is a {type(target).__name__}, not a class or function.")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some built-ins have no signature: nothing more to check
        return target
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = None  # takes any keyword
    else:
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    given = [k for k in node.keys() if k not in HYDRA_KEYS]
    supplied = list(supplied)
    if names is not None:
        unknown = [k for k in given if k not in names]
        if unknown:
            keys = ", ".join(f"{key}.{k}" for k in unknown)
            raise ConfigError(f"{target_key}={node._target_!r} takes no argument {', '.join(unknown)} "
                              f"(set by {keys}); it takes: {', '.join(sorted(names)) or 'nothing'}.")
        not_taken = [k for k in supplied if k not in names and k != "params"]
        if not_taken:
            raise ConfigError(f"{target_key}={node._target_!r} does not take {', '.join(not_taken)}, which cnnexp "
                              f"passes to every {key}.")
    if complete:
        missing = [p.name for p in params
                   if p.default is inspect.Parameter.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and p.name not in given and p.name not in supplied]
        if "params" in supplied and missing and missing[0] == _first_positional(signature):
            missing = missing[1:]  # the parameters go in first, by position
        if missing:
            adds = " ".join(f"+{key}.{m}=..." for m in missing)
            raise ConfigError(f"{target_key}={node._target_!r} needs {', '.join(missing)}, which the config "
                              f"does not set; add {adds}.")
    return target


def _first_positional(signature: inspect.Signature) -> str | None:
    for p in signature.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return p.name
    return None


def check_all_targets(cfg: DictConfig) -> None:
    """Check every `_target_` in cfg: the model and optimiser fully (cnnexp knows
    what it passes them), any other group's for import and its keys."""
    for key, node in _target_nodes(cfg, ""):
        group = key.split(".")[0]
        if key == "optim":  # the optim group's own keys another optimiser lacks are left out, not refused
            node = optimizer_config(node, quiet=True)
        target = check_target(node, key, supplied=SUPPLIED.get(group, ()), complete=group in SUPPLIED and key == group)
        if key == "optim":
            check_step(node, target)


def check_step(node: DictConfig, optimizer) -> None:
    """cnnexp's loop calls optimizer.step() with no arguments; LBFGS and the like
    need a closure that re-evaluates the loss."""
    try:
        params = list(inspect.signature(optimizer.step).parameters.values())[1:]
    except (AttributeError, TypeError, ValueError):
        return
    needed = [p.name for p in params
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if needed:
        raise ConfigError(f"optim._target_={node._target_!r} needs {', '.join(needed)} in every step() (a function "
                          "that re-evaluates the loss), which cnnexp's training loop does not give; choose another "
                          "optimiser, such as optim=sgd or optim=adam.")


def _target_nodes(node, key: str):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield key, node
        for k in node.keys():
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)) and not OmegaConf.is_missing(node, k):
                yield from _target_nodes(node[k], f"{key}.{k}" if key else str(k))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(node[i], f"{key}[{i}]")


def instantiate_checked(node: DictConfig, key: str, **kwargs):
    """hydra.utils.instantiate, with an error the target raises while being
    built (a bad value it checks itself) turned into one line naming the key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        first = str(cause).splitlines()[0] if str(cause) else ""
        raise ConfigError(f"{key}._target_={node._target_!r} could not be built from the {key}.* keys: "
                          f"{type(cause).__name__}: {first}") from None


# ---------------------------------------------------------------- the optimiser's arguments
# Which optimiser settings reach the optimiser named by `optim._target_`.
#
# A group option (conf/optim/sgd.yaml) holds the keys of its own optimiser, so
# `optim._target_=torch.optim.RMSprop` arrives with SGD's `nesterov`. A key the
# optimiser does not take is left out when it is one of the group's own keys at
# the group's value; set on the command line (`optim.nesterov=true`) or added
# (`+optim.amsgrad=true`) it reaches the `_target_` checks above,
# which refuse it: asking RMSprop for Nesterov momentum is a mistake to name.

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
    """The group option's own keys and values, from its schema (config/schema.py)."""
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
    check_step(optim_cfg, factory)
    try:
        try:  # torch.optim checks its values before its parameters: an empty list stops it there, before
            factory([], **kwargs)  # its first parameter group imports torch._dynamo (a second at start-up)
        except ValueError as err:
            if "empty parameter list" not in str(err):
                raise
        else:  # an optimiser that takes no parameters: check it on one
            factory([torch.zeros(1, requires_grad=True)], **kwargs)
    except (TypeError, ValueError) as err:
        settings = " ".join(f"optim.{k}={v}" for k, v in kwargs.items())
        raise ConfigError(f"{optim_cfg._target_} refuses {settings}: {str(err).splitlines()[0]}") from None
