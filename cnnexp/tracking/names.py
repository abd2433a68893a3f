"""What a run is called in the trackers, and its config as flat key/value pairs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

MAX_LABEL = 200  # a directory name must stay under the file system's 255 bytes


def run_label(overrides: list[str], sweep_dir: Path | None = None) -> str:
    """The run's name in TensorBoard and MLflow: its overrides, `key=value,...`.

    In a sweep only the swept keys name a job (the overrides every job shares
    would repeat in each name); a run without overrides is `defaults`."""
    # Hydra's own keys and the choice of trackers say nothing about the run itself.
    pairs = [o for o in overrides if _key(o).split(".")[0] not in ("hydra", "logger")]
    swept = _swept_keys(sweep_dir) if sweep_dir is not None else set()
    if swept:
        pairs = [o for o in pairs if _key(o) in swept] or pairs
    label = ",".join(pairs) or "defaults"
    label = label.replace("/", "∕")  # a path separator would nest TensorBoard's run directory
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _swept_keys(sweep_dir: Path) -> set[str]:
    """Keys the sweep command gave several values (read from Hydra's multirun.yaml)."""
    try:
        saved = yaml.safe_load((Path(sweep_dir) / "multirun.yaml").read_text())
        task = saved["hydra"]["overrides"]["task"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return set()
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    except Exception:  # a sweeper's own syntax we cannot read: name jobs by all their overrides
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


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
