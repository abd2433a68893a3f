"""A sweep's table: one row per job, rebuilt from the job directories on disk.

run.json, metrics.csv and .hydra/overrides.yaml of each numbered job dir are
all it reads, so the same code serves a sweep in progress, a finished one,
one with failed or interrupted jobs, and one copied back from a cluster.
Jobs with a validation split are selected and ranked by it
(results/objective.py); the test accuracy at the selected epoch is the
number to report.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml

from cnnexp.results.files import LOG_FILE, METRICS_FILE, MULTIRUN_FILE, OVERRIDES_FILE, RUN_RECORD
from cnnexp.results.metrics import read_metrics
from cnnexp.results.objective import best_row, selected_row
from cnnexp.results.record import read_record

SEED_KEY = "trainer.seed"
GROUPED_METRICS = ["best_test_acc", "final_test_acc", "final_train_loss"]
# Jobs with a validation split are selected and ranked by it; the test accuracy at
# the selected epoch is the number to report.
VAL_METRICS = ["best_val_acc", "best_epoch", "test_acc_at_best", "final_val_acc"]
VAL_GROUPED_METRICS = ["best_val_acc", "test_acc_at_best", "final_test_acc", "final_train_loss"]
RANKED_BY = "best_val_acc"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The numbered job directories of a sweep, in job order."""
    dirs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(dirs, key=lambda p: int(p.name))


def is_sweep_dir(path: Path) -> bool:
    return (path / MULTIRUN_FILE).is_file() or any(
        (d / RUN_RECORD).is_file() or (d / METRICS_FILE).is_file() for d in job_dirs(path)
    )


def job_overrides(job_dir: Path) -> dict[str, str]:
    """key -> value of the job's command-line overrides (Hydra's own keys left out)."""
    overrides = None
    path = job_dir / OVERRIDES_FILE
    if path.is_file():
        overrides = yaml.safe_load(path.read_text()) or []
    else:
        overrides = (read_record(job_dir) or {}).get("overrides", [])
    pairs = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra"):
            pairs[key] = value
    return pairs


def _read_metrics(path: Path) -> pd.DataFrame | None:
    """A job's metrics.csv, or None when it is missing, unreadable or has no rows yet."""
    metrics = read_metrics(path)[0]
    return metrics if metrics is not None and {"test_acc", "train_loss"} <= set(metrics.columns) else None


def _job_row(job_dir: Path) -> tuple[dict, pd.DataFrame | None]:
    record = read_record(job_dir) or {}
    metrics = _read_metrics(job_dir / METRICS_FILE)
    done = metrics is not None
    if record:
        status, error = record.get("status", "unknown"), (record.get("error") or "").split("\n")[0]
    else:  # the job died before cnnexp wrote its record
        status, error = ("unknown" if done else "failed"), f"no run.json; see {job_dir / LOG_FILE}"
    rows = metrics.to_dict("records") if done else []
    best = selected_row(rows)
    if best is not None:
        return {
            "status": status,
            "error": error,
            "epochs": len(metrics),
            "best_val_acc": float(best["val_acc"]),
            "best_epoch": int(best["epoch"]),
            "test_acc_at_best": float(best["test_acc"]),
            "final_val_acc": float(metrics["val_acc"].iloc[-1]),
            "final_test_acc": float(metrics["test_acc"].iloc[-1]),
            "final_train_loss": float(metrics["train_loss"].iloc[-1]),
            "wall_seconds": record.get("wall_seconds", math.nan),
            "run_dir": str(job_dir),
        }, metrics
    best_test = best_row(rows, "test_acc")
    row = {
        "status": status,
        "error": error,
        "epochs": len(metrics) if done else 0,
        "best_test_acc": float(best_test["test_acc"]) if best_test is not None else math.nan,
        "best_epoch": int(best_test["epoch"]) if best_test is not None else math.nan,
        "final_test_acc": float(metrics["test_acc"].iloc[-1]) if done else math.nan,
        "final_train_loss": float(metrics["train_loss"].iloc[-1]) if done else math.nan,
        "wall_seconds": record.get("wall_seconds", math.nan),
        "run_dir": str(job_dir),
    }
    return row, metrics


def swept_keys(overrides: list[dict[str, str]]) -> list[str]:
    """Keys whose value differs between jobs (all override keys for a one-job sweep)."""
    keys = []
    for ov in overrides:
        keys += [k for k in ov if k not in keys]
    if len(overrides) <= 1:
        return keys
    return [k for k in keys if len({ov.get(k) for ov in overrides}) > 1]


def summarise(sweep_dir: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict[str, list[str]] | None]:
    """summary table, per-job curves keyed by label, seed groups (label -> job labels) or None."""
    dirs = job_dirs(sweep_dir)
    overrides = [job_overrides(d) for d in dirs]
    keys = swept_keys(overrides)
    rows, curves, labels = [], {}, []
    for job_dir, ov in zip(dirs, overrides):
        row, metrics = _job_row(job_dir)
        label = " ".join(f"{k}={ov.get(k, '')}" for k in keys) or f"job {job_dir.name}"
        named = read_record(job_dir) or {}  # the job's name= and tags= (run.json)
        rows.append({"job": int(job_dir.name), **{k: ov.get(k, "") for k in keys}, **row,
                     "name": named.get("name", ""), "tags": ",".join(named.get("tags") or [])})
        labels.append(label)
        if metrics is not None:
            curves[label] = metrics
    table = pd.DataFrame(rows)
    with_val = "best_val_acc" in table
    if with_val:  # some jobs may lack the split (failed early, or data.val_size swept to 0)
        fixed = ["status", "error", "epochs", *VAL_METRICS, "final_test_acc", "final_train_loss"]
        table = table[["job", *keys, *fixed, *[c for c in table if c not in ("job", *keys, *fixed)]]]
        table = table.drop(columns=[c for c in ("best_test_acc",) if c in table])
    if len(table):
        table["best_epoch"] = table["best_epoch"].astype("Int64")  # stays an integer beside failed jobs
    groups = None
    if SEED_KEY in keys and len(rows) > 1:
        group_keys = [k for k in keys if k != SEED_KEY]
        group_labels = [" ".join(f"{k}={r[k]}" for k in group_keys) or "all seeds" for r in rows]
        table["group"] = group_labels
        for metric in VAL_GROUPED_METRICS if with_val else GROUPED_METRICS:
            by_group = table.groupby("group")[metric]
            table[f"group_mean_{metric}"] = by_group.transform("mean")
            table[f"group_std_{metric}"] = by_group.transform(lambda s: s.std(ddof=1))  # sample std (n - 1)
        groups = {}
        for group, label in zip(group_labels, labels):
            groups.setdefault(group, []).append(label)
    if with_val:
        rank_by(table, f"group_mean_{RANKED_BY}" if groups else RANKED_BY, after=len(keys) + 1)
    return table, curves, groups


def rank_by(table: pd.DataFrame, column: str, after: int) -> None:
    """Add `rank` (1 is best; equal values share a rank, jobs without a value get
    none) and `ranked_by`, naming the column, at position `after`."""
    table.insert(after, "rank", table[column].rank(ascending=False, method="min").astype("Int64"))
    table.insert(after + 1, "ranked_by", column)


def ranked_first(table: pd.DataFrame) -> pd.Series | None:
    """The job ranked first (the first of equals), when the jobs have a split; else None."""
    if "ranked_by" not in table or not (table["rank"] == 1).any():
        return None
    return table[table["rank"] == 1].iloc[0]


def best_by_validation_line(table: pd.DataFrame) -> str | None:
    """The job ranked first, with the test accuracy to report, when the jobs have a split."""
    best = ranked_first(table)
    if best is None:
        return None
    return (f"Best by {best['ranked_by']}: job {best['job']} ({best['run_dir']}), validation accuracy "
            f"{best['best_val_acc']:.4f} at epoch {best['best_epoch']}, test accuracy there {best['test_acc_at_best']:.4f}")


# A pruned search trial stopped early on purpose: a normal outcome, not a failure.
ENDED_WELL = ("completed", "pruned")


def failed_jobs_line(table: pd.DataFrame) -> str | None:
    if not len(table):
        return None
    unit = "trial" if "trial" in table else "job"  # a search's summary has one row per trial
    if "state" in table:  # a search: the study's state says how each trial ended
        table = table[table["state"] != "waiting"].sort_values("trial")  # enqueued, never started
        bad = table[table["state"].isin(["fail", "running"])]
    else:
        started = table[table["status"].fillna("") != ""] if unit == "trial" else table  # not queued ones
        bad = started[~started["status"].isin(ENDED_WELL)]
    if not len(bad):
        return None
    parts = [f"{unit} {getattr(r, unit)} {_how_it_ended(r)}" for r in bad.itertuples()]
    return f"{len(bad)} of {len(table)} sweep {unit}s did not complete: " + "; ".join(parts)


def _how_it_ended(row) -> str:
    if getattr(row, "state", None) == "running":
        return "did not finish (its process stopped first; run the same command again to continue it)"
    status = row.status if isinstance(row.status, str) and row.status else "failed"
    error = row.error if isinstance(row.error, str) and row.error else ""
    return status + (f" ({error})" if error else "")
