"""Keys nothing reads: the closest real key, the message, and the check of the
command line before Hydra composes anything.

Hydra refuses `trainer.nosuchkey=1` itself, with three lines about struct
mode and a hint to add the key with `+` (which would only make a key that
nothing reads). `unknown_override` catches it first, from the schema alone:
the group options come from the command line or conf/config.yaml's defaults list.
A command line whose preset (`experiment=`) or search path may bring other
options is left to Hydra, and to config/checks.py once composed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cnnexp.config.schema import SCHEMAS, Config

# Names other training tools use for a key cnnexp spells differently.
OTHER_NAMES = {"amp": "trainer.precision", "fp16": "trainer.precision", "bf16": "trainer.precision",
               "epochs": "trainer.max_epochs", "num_epochs": "trainer.max_epochs", "lr": "optim.lr",
               "learning_rate": "optim.lr", "batch_size": "data.batch_size",
               "patience": "trainer.early_stopping.patience",
               "augmentation": "augment", "run_name": "name", "tag": "tags", "description": "notes"}


def closest_key(key: str, known: list[str]) -> str | None:
    """The real key a mistyped one most likely meant: beside it, under another tool's
    name for it, or anywhere with the same last part."""
    parent, _, name = key.rpartition(".")
    beside = {k[len(parent) + 1:] if parent else k: k for k in known if not parent or k.startswith(parent + ".")}
    match = difflib.get_close_matches(name, list(beside), n=1, cutoff=0.6)
    if match:
        return beside[match[0]]
    if OTHER_NAMES.get(name) in known:
        return OTHER_NAMES[name]
    by_name = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] != parent}
    match = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.8)
    return by_name[match[0]] if match else None


def unknown_key_text(key: str, known: list[str], option: str | None) -> str:
    """One line on `key`, which no schema node defines; `known`: every real key;
    `option`: the option chosen for key's group, if known."""
    parent, _, name = key.rpartition(".")
    where = f"in {parent}" if parent else "at the top level"
    group = key.split(".")[0]
    others = [other for other, node in SCHEMAS.get(group, {}).items()
              if parent == group and name in {f.name for f in dataclasses.fields(node)}]
    if others:  # a key of another option of the same group
        this = f"{group}={option}" if option else f"this {group} option"
        return (f"{key}: no such key in {this} (it is a key of {group}={others[0]}), so nothing in cnnexp would "
                f"read it; choose {group}={others[0]} or remove it.")
    head = f"{key}: no such key {where}, so nothing in cnnexp would read it"
    closest = closest_key(key, known)
    if closest:
        return f"{head}; the closest key is {closest} (remove {key}, or set {closest} instead)."
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    return f"{head}; the keys {where} are: {', '.join(siblings)}."


def brings_unseen_config(arguments: list[str]) -> bool:
    """Whether the command line picks a preset (experiment=...) or another config
    directory (hydra.searchpath): either may set keys and group options the
    command line does not show, so only a composed config tells."""
    return any(a.lstrip("+~").startswith(("experiment", "hydra.searchpath")) for a in arguments)


def default_options(config_yaml: Path) -> dict[str, str]:
    """The option of each schema group a plain command gets: config.yaml's defaults list."""
    entries = OmegaConf.load(config_yaml).get("defaults", [])
    return {group: str(option) for entry in entries if isinstance(entry, DictConfig)
            for group, option in entry.items() if group in SCHEMAS}


def unknown_override(arguments: list[str], defaults: dict[str, str]) -> str | None:
    """The message for the first `key=value` on the command line (no `+`) whose key
    the schema does not have, or None. Only what the schema alone decides;
    `defaults`: the option of each group when the command line names none."""
    if brings_unseen_config(arguments):
        return None
    overrides = [a for a in arguments if "=" in a and not a.startswith(("-", "+", "~"))]
    options = dict(defaults)
    options.update({k: v for k, _, v in (a.partition("=") for a in overrides) if k in options})
    schemas = {group: SCHEMAS[group].get(options[group]) for group in SCHEMAS}
    for argument in overrides:
        key = argument.partition("=")[0]
        group = key.split(".")[0]
        if key in ("experiment", "logger") or "/" in key or key.startswith("hydra.") or \
                (group in schemas and (schemas[group] is None or "." not in key)):
            continue  # a group choice, Hydra's own, or an option cnnexp has no schema for (a sweep over options)
        if not _defined(key, schemas):
            known = [k for name in typing.get_type_hints(Config) for k in (name, *_keys(_node(name, schemas), name))]
            return unknown_key_text(key, known, options.get(group))
    return None


def _node(name: str, schemas: dict[str, type | None]):
    """The schema of a top-level key: its chosen group option's node, or Config's field type."""
    return schemas[name] if name in schemas else typing.get_type_hints(Config).get(name)


def _defined(key: str, schemas: dict[str, type | None]) -> bool:
    head, *rest = key.split(".")
    node = _node(head, schemas)
    if node is None:
        return False
    for name in rest:
        if not dataclasses.is_dataclass(node):
            return True  # inside a list, a dict or an untyped value: not the schema's to say
        hints = typing.get_type_hints(node)
        if name not in hints:
            return False
        node = hints[name]
    return True


def _keys(node, path: str) -> list[str]:
    if not dataclasses.is_dataclass(node):
        return []
    hints = typing.get_type_hints(node)
    return [k for name in hints for k in (f"{path}.{name}", *_keys(hints[name], f"{path}.{name}"))]
