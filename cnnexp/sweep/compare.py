"""Runs and sweeps side by side: one table of their headline figures and overlays of their curves.

Any mix of run directories and sweep directories (each sweep contributes its
jobs) becomes one row per run, read from the run's own files (run.json,
metrics.csv, .hydra/config.yaml), so runs from different days, sweeps,
machines or cnnexp versions compare alike. The selected epoch is the
project's one rule (results/objective.py): the highest validation accuracy
with a validation split, else the last epoch. Rows are sorted by the chosen
metric at that epoch, best first.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from cnnexp.errors import ConfigError
from cnnexp.results.files import CONFIG_FILE, METRICS_FILE, RUN_MARKERS
from cnnexp.results.metrics import read_metrics
from cnnexp.results.objective import selected_row
from cnnexp.results.record import read_record
from cnnexp.sweep.table import is_sweep_dir, job_dirs
from cnnexp.tracking.names import IDENTITY_KEYS, flat_config

# Config keys that say how a run was watched or where it wrote, not what it trained.
NOT_COMPARED = ("hydra.", "logger.", "trainer.progress", "trainer.resume", "trainer.log_every_steps",
                "data.root", *IDENTITY_KEYS)
SIGNIFICANT = 4  # digits shown on the terminal and in legends; the CSV keeps full precision


@dataclass
class Compared:
    """One run as the comparison sees it."""

    label: str
    path: Path
    record: dict
    metrics: pd.DataFrame | None
    config: dict


def expand(paths: list[str]) -> list[Path]:
    """The paths, globs expanded (a shell that did not expand them, or a quoted pattern),
    in the order given; ConfigError for a path or pattern that names nothing."""
    found: list[Path] = []
    for text in paths:
        # a pattern such as sweep/* also matches the sweep's own files: only its folders count
        matches = sorted(m for m in glob.glob(text) if Path(m).is_dir()) if glob.has_magic(text) else [text]
        if not matches or not Path(matches[0]).exists():
            raise ConfigError(f"{text}: no such run or sweep directory.")
        found += [Path(m) for m in matches if Path(m) not in found]
    return found


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def collect(paths: list[Path]) -> list[Compared]:
    """Every run the paths name: a run directory itself, a sweep directory's jobs."""
    runs: list[Compared] = []
    for path in paths:
        if is_run_dir(path):
            runs.append(_read(path, None))
        elif path.is_dir() and is_sweep_dir(path):
            runs += [_read(job, path) for job in job_dirs(path)]
        else:
            raise ConfigError(f"{path} is neither a run directory (metrics.csv, run.json) nor a sweep directory "
                              "(numbered job folders); give run or sweep directories.")
    if not runs:
        raise ConfigError("the directories given hold no runs yet.")
    return runs


def _read(run_dir: Path, sweep_dir: Path | None) -> Compared:
    record = read_record(run_dir) or {}
    metrics = read_metrics(run_dir / METRICS_FILE)[0]
    try:
        config = flat_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {})
    except (OSError, yaml.YAMLError):
        config = {}
    name = record.get("name") or (f"{sweep_dir.name}/{run_dir.name}" if sweep_dir else run_dir.name)
    return Compared(label=str(name), path=run_dir, record=record, metrics=metrics, config=config)


def differing_keys(runs: list[Compared]) -> list[str]:
    """Config keys whose value is not the same in every run (absent counts as a value)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys and not k.startswith(NOT_COMPARED)]
    return [k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1]


def sort_column(metric: str) -> str:
    """The table column holding `metric` (a metrics.csv column) at the selected epoch."""
    return f"{metric}_at_selected"


def headline(run: Compared, metric: str) -> dict:
    """The selected epoch and the numbers at it, the last epoch's test accuracy, epochs and wall time."""
    rows = run.metrics.to_dict("records") if run.metrics is not None else []
    selected = selected_row(rows)
    chosen = selected or (rows[-1] if rows else None)  # no split: the last epoch is the run's result

    def at(column: str) -> float:
        return float(chosen[column]) if chosen is not None and column in chosen else math.nan

    return {
        "selected_epoch": int(chosen["epoch"]) if chosen is not None else None,
        "selected_by": "val_acc" if selected is not None else ("last epoch" if rows else ""),
        **{sort_column(c): at(c) for c in dict.fromkeys(("val_acc", "test_acc", metric))},
        "final_test_acc": float(rows[-1]["test_acc"]) if rows and "test_acc" in rows[-1] else math.nan,
        "epochs": len(rows),
        "wall_seconds": run.record.get("wall_seconds", math.nan),
        "status": run.record.get("status", "unknown"),
    }


def comparison_table(runs: list[Compared], metric: str = "test_acc") -> pd.DataFrame:
    """One row per run, best first by `metric` at the selected epoch (lower is better for a loss)."""
    columns = set().union(*(set(r.metrics.columns) for r in runs if r.metrics is not None))
    if metric not in columns:
        known = ", ".join(sorted(c for c in columns if c != "epoch")) or "none: no run has metrics yet"
        raise ConfigError(f"--metric {metric}: no run has that metrics.csv column; the columns are: {known}.")
    keys = differing_keys(runs)
    rows = []
    for run in runs:
        rows.append({"run": run.label, **headline(run, metric),
                     "tags": ",".join(str(t) for t in run.record.get("tags") or []),
                     **{k: run.config.get(k, "") for k in keys}, "path": str(run.path)})
    table = pd.DataFrame(rows)
    if table["val_acc_at_selected"].isna().all():  # no run has a validation split
        table = table.drop(columns="val_acc_at_selected")
    by, lower_is_better = sort_column(metric), metric.endswith("loss")
    table = table.sort_values(by, ascending=lower_is_better, na_position="last", kind="stable")
    table.insert(0, "rank", table[by].rank(ascending=lower_is_better, method="min").astype("Int64"))
    table["selected_epoch"] = table["selected_epoch"].astype("Int64")  # stays an integer beside empty runs
    return table.reset_index(drop=True)


def readable(table: pd.DataFrame) -> str:
    """The table for a terminal: numbers to SIGNIFICANT digits, the path left for the CSV."""
    shown = table.drop(columns=["path"])
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.{SIGNIFICANT}g}")


def curves(runs: list[Compared], table: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """label (with its rounded metric) -> metrics, in the table's order, for the overlay figures."""
    value = dict(zip(table["path"], table[sort_column(metric)]))
    out = {}
    for run in sorted(runs, key=lambda r: list(table["path"]).index(str(r.path))):
        if run.metrics is None:
            continue
        number = value.get(str(run.path), math.nan)
        label = run.label if math.isnan(number) else f"{run.label} ({metric} {shown(metric, number)})"
        while label in out:  # two runs of the same name
            label += " '"
        out[label] = run.metrics
    return out


def shown(metric: str, value: float) -> str:
    """A value for a legend, in the figures' units: accuracies in %, rounded for reading."""
    if metric.endswith("_acc"):
        return f"{100 * value:.{SIGNIFICANT - 1}g} %"
    return f"{value:.{SIGNIFICANT}g}"
