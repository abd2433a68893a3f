"""Checks that run before any work: no download, no training, no files.

Types and unknown keys are checked by the schema (config/schema.py) while
Hydra composes, except keys added with `+key=value` or `++key=value`: Hydra
adds those to any node, schema or not (OmegaConf's force_add ignores the
struct flag), so nothing would read them. `check_unknown_keys` refuses them
in the composed config; the SweepKeysCheck callback (config/sweep_keys.py)
does the same for every job of a sweep or search before the first one
starts. The rest are the ranges and facts a type cannot express. Each failure
is one ConfigError naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp.config.keys import unknown_key_text
from cnnexp.config.schema import Config, field_checks
from cnnexp.config.targets import check_all_targets
from cnnexp.config.training import check_training_options
from cnnexp.data import check_val_size
from cnnexp.data.imagefolder import check_layout
from cnnexp.errors import ConfigError
from cnnexp.results.objective import from_config

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}.")


# What a mandatory key (??? in the config) holds, for the message when it is not set.
MANDATORY_HINTS = {"data.root": "a folder holding train/<class>/ and test/<class>/"}


def validate_config(cfg: DictConfig) -> None:
    check_unknown_keys(cfg)
    check_mandatory(cfg)
    check_top_level(cfg)
    data = cfg.data
    for group in ("optim", "data", "trainer", "augment", "model"):
        check_keys(cfg[group], group)
    if not (len(data.mean) == len(data.std) and len(data.mean) in (1, 3)):
        raise ConfigError(f"data.mean={list(data.mean)} and data.std={list(data.std)} do not fit: give one value, "
                          "or one per colour channel (3), in both.")
    check_device(cfg.trainer.device)
    validate_model(cfg.model)
    check_all_targets(cfg)
    if data.name == "imagefolder":
        check_layout(str(data.root))
    check_split_and_objective(cfg)
    check_training_options(cfg, resolve_device(cfg.trainer.device).type)


# ---------------------------------------------------------------- keys nothing reads
def check_unknown_keys(cfg: DictConfig) -> None:
    """Refuse a key that no part of cnnexp reads (one added with `+`), naming the closest real key.

    A node with a `_target_` passes its keys to that target: config/targets.py
    checks them against its signature, so a custom model's own keys stay allowed.
    An untyped node (a user's own group option without a schema) is not checked."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0], cfg))


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys of cfg that its schema does not define (Hydra's own `hydra` node left out)."""
    found: list[str] = []
    _walk_unknown(cfg, "", found)
    return found


def _walk_unknown(node: DictConfig, path: str, found: list[str]) -> None:
    if "_target_" in node:
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for name in node.keys():
        key = f"{path}.{name}" if path else str(name)
        if key == "hydra":
            continue
        if known is not None and name not in known:
            found.append(key)
            continue
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not OmegaConf.is_missing(node, name) and not child._is_none():
            _walk_unknown(node[name], key, found)


def known_keys(cfg: DictConfig) -> list[str]:
    """Every key the composed config's schema defines, as dotted paths."""
    keys: list[str] = []

    def walk(node: DictConfig, path: str, schema) -> None:
        for f in dataclasses.fields(schema):
            key = f"{path}.{f.name}" if path else f.name
            keys.append(key)
            child = node.get(f.name) if node is not None and f.name in node else None
            child_schema = OmegaConf.get_type(child) if isinstance(child, DictConfig) else f.type
            if dataclasses.is_dataclass(child_schema):
                walk(child if isinstance(child, DictConfig) else None, key, child_schema)
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        walk(cfg, "", schema)
    return keys


def unknown_key_message(key: str, cfg: DictConfig) -> str:
    choice = OmegaConf.select(cfg, f"{key.split('.')[0]}.name", default=None)
    return unknown_key_text(key, known_keys(cfg), choice if isinstance(choice, str) else None)


def check_keys(node: DictConfig, group: str) -> None:
    """The range check of each key the schema gives one (config/schema.py)."""
    for name, (check, allowed) in field_checks(group).items():
        if name in node:
            value = node[name]
            plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            _require(check(plain), f"{group}.{name}", plain, allowed)


def check_top_level(cfg: DictConfig) -> None:
    """The checks of the top-level keys (name, ...) the schema gives one."""
    for f in dataclasses.fields(Config):
        check = f.metadata.get("check")
        if check is not None and f.name in cfg:
            _require(check(cfg[f.name]), f.name, cfg[f.name], f.metadata["allowed"])


def check_mandatory(cfg: DictConfig) -> None:
    """Keys a group option leaves for the user to set (data=imagefolder's data.root)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        hint = f" ({MANDATORY_HINTS[key]})" if key in MANDATORY_HINTS else ""
        raise ConfigError(f"{key} must be set: add {key}=...{hint} to the command.")


def validate_model(model: DictConfig) -> None:
    """Ranges of the keys cnnexp's models take; any model with such a key gets the same check."""
    if "width" in model:
        _require(model.width >= 1, "model.width", model.width, "the first block needs at least 1 channel")
    if "dropout" in model:
        _require(0 <= model.dropout < 1, "model.dropout", model.dropout, "a probability in [0, 1)")


def check_split_and_objective(cfg: DictConfig) -> None:
    known_train_size = {"synthetic": cfg.data.get("n_train"), "cifar10": 50000}.get(cfg.data.name)
    check_val_size(cfg.data.val_size, known_train_size)
    if not cfg.trainer.resume:  # a resumed run is checked against its own split (run/job.py)
        from_config(cfg)


def check_device(device: str) -> None:
    _require(bool(DEVICE_PATTERN.match(device)), "trainer.device", device, "use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={device!r} but no CUDA GPU is available here; use trainer.device=cpu (or auto)."
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        _require(index < torch.cuda.device_count(), "trainer.device", device,
                 f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("trainer.device='mps' but MPS is not available here; use trainer.device=cpu (or auto).")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
