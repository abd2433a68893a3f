"""What a run is called in the trackers, and its config as flat key/value pairs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from cnnexp.results.files import MULTIRUN_FILE, SEARCH_FILE

MAX_LABEL = 200  # a directory name must stay under the file system's 255 bytes
IDENTITY_KEYS = ("name", "tags", "notes")  # what a user calls a run; not part of what it trains


def run_identity(cfg: DictConfig, overrides: list[str], sweep_dir: Path | None = None) -> dict:
    """name, tags and notes of a run, as run.json, summaries and trackers show them.

    The name is `name=...`, else the run's label (its overrides, run_label). In
    a sweep that gives one `name=` to every job, that is the sweep's name, and a
    job is `<name>/<its label>`; a swept name (`name=a,b`) names each job itself."""
    label = run_label(overrides, sweep_dir)
    given = cfg.get("name")
    if not given:
        name = label
    elif sweep_dir is not None and sweep_identity(sweep_dir)["name"] == given:
        name = f"{given}/{label}"
    else:
        name = str(given)
    return {"name": name, "tags": [str(t) for t in cfg.get("tags") or []], "notes": str(cfg.get("notes") or "")}


def sweep_identity(sweep_dir: Path) -> dict:
    """The sweep's own name, tags and notes (those its command gives every job, as
    multirun.yaml holds them); the name defaults to the sweep dir's last two parts."""
    try:
        saved = yaml.safe_load((Path(sweep_dir) / MULTIRUN_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    return {"name": saved.get("name") or "sweep " + "/".join(Path(sweep_dir).resolve().parts[-2:]),
            "tags": [str(t) for t in saved.get("tags") or []], "notes": str(saved.get("notes") or "")}


def run_label(overrides: list[str], sweep_dir: Path | None = None) -> str:
    """The run's name in TensorBoard and MLflow: its overrides, `key=value,...`.

    In a sweep, overrides every job shares (those the sweep command gave one
    value) would repeat in each name, so a job is named by the rest: the swept
    values, or what a search sampled. A run without overrides is `defaults`."""
    # Hydra's own keys, the choice of trackers and the run's own name, tags and notes
    # say nothing about what the run trains.
    pairs = [o for o in overrides if _key(o).split(".")[0] not in ("hydra", "logger", *IDENTITY_KEYS)]
    if sweep_dir is not None:
        searched = _searched_keys(sweep_dir)
        if searched:
            pairs = [o for o in pairs if _key(o) in searched] or pairs
        else:
            shared = _sweep_command_overrides(sweep_dir)
            pairs = [o for o in pairs if o not in shared] or pairs
    label = ",".join(pairs) or "defaults"
    label = label.replace("/", "∕")  # a path separator would nest TensorBoard's run directory
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _sweep_command_overrides(sweep_dir: Path) -> set[str]:
    """The overrides of the sweep command, as Hydra saved them in multirun.yaml."""
    try:
        saved = yaml.safe_load((Path(sweep_dir) / MULTIRUN_FILE).read_text())
        return {str(o) for o in saved["hydra"]["overrides"]["task"]}
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return set()


def _searched_keys(sweep_dir: Path) -> set[str]:
    """The keys an Optuna search samples (its search.yaml), or none for a grid sweep."""
    try:
        saved = yaml.safe_load((Path(sweep_dir) / SEARCH_FILE).read_text())
        return {str(k) for k in saved.get("params") or {}}
    except (OSError, AttributeError, yaml.YAMLError):
        return set()


def flat_config(cfg: DictConfig | dict) -> dict[str, str | int | float | bool]:
    """`section.key -> value`, lists and nulls as text (what both trackers accept as parameters)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, (bool, int, float, str)):
                flat[name] = value
            else:
                flat[name] = json.dumps(value)
    walk(tree, "")
    return flat


def numeric_columns(row: dict) -> dict[str, float]:
    """The row's numeric values except the epoch (val_* columns included when present)."""
    out = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if number == number and abs(number) != float("inf"):
            out[key] = number
    return out
