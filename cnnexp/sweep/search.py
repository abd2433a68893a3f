"""A hyperparameter search's results: summary.csv (one row per trial), best.txt
and the study's figures, rebuilt from the study and the job directories.

The Optuna sweeper writes `search.yaml` into the sweep dir: where the study
lives and what it optimises. Its presence makes a sweep dir a search, so the
sweep summary (sweep/summary.py), the end of the sweep and
`python -m cnnexp.plot SWEEP_DIR` all come here.
"""

from __future__ import annotations

import logging
import math
import shlex
import warnings
from pathlib import Path

import pandas as pd
import yaml

from cnnexp.figures import plt, render_sweep
from cnnexp.results.files import BEST_FILE, METRICS_FILE, SEARCH_FILE, STUDY_DB, SUMMARY_FILE
from cnnexp.results.record import read_record
from cnnexp.safeio import write_text
from cnnexp.sweep.pruning import open_storage, require_optuna
from cnnexp.sweep.table import job_dirs, job_overrides, summarise, swept_keys

log = logging.getLogger("cnnexp")


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{Path(sweep_dir).resolve() / STUDY_DB}"


def is_search(sweep_dir: Path) -> bool:
    return (Path(sweep_dir) / SEARCH_FILE).is_file()


def write_marker(sweep_dir: Path, **info) -> None:
    """search.yaml; storage None means optuna.db beside it (so the dir can be moved)."""
    path = Path(sweep_dir) / SEARCH_FILE
    write_text(path, "# Written by cnnexp's Optuna sweeper: where the study lives and what it optimises.\n"
               + yaml.safe_dump(info, sort_keys=False))


def read_marker(sweep_dir: Path) -> dict:
    return yaml.safe_load((Path(sweep_dir) / SEARCH_FILE).read_text()) or {}


def open_study(sweep_dir: Path):
    """(study, search.yaml's contents) of a search's sweep dir."""
    optuna = require_optuna()
    info = read_marker(sweep_dir)
    url = info.get("storage") or default_storage(sweep_dir)
    return optuna.load_study(study_name=info.get("study_name", "cnnexp"), storage=open_storage(url)), info


def best_trial(study):
    """The best completed trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None


def rerun_command(job_dir: Path, overrides: list[str] | None) -> str:
    """The command that trains a trial's configuration as a plain run."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    if path.is_file():
        overrides = yaml.safe_load(path.read_text()) or []
    return " ".join(["python -m cnnexp", *(shlex.quote(str(o)) for o in overrides or [])])


# ------------------------------------------------------------------ the table
def search_table(sweep_dir: Path, study, info: dict) -> pd.DataFrame:
    """One row per trial: number, state, parameters, objective, epochs run, the job's results, run dir."""
    sweep_dir = Path(sweep_dir)
    jobs, _, _ = summarise(sweep_dir)
    override_keys = set(swept_keys([job_overrides(d) for d in job_dirs(sweep_dir)]))
    by_number = {int(r["job"]): r for r in jobs.to_dict("records")} if len(jobs) else {}
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    param_keys: list[str] = []
    for t in trials:
        param_keys += [k for k in t.params if k not in param_keys]
    rows = []
    for t in trials:
        job = by_number.get(t.number, {})
        job_dir = sweep_dir / str(t.number)
        row = {"trial": t.number, "state": t.state.name.lower(), "status": job.get("status", "")}
        row.update({k: t.params.get(k, math.nan) for k in param_keys})
        row["objective"] = t.value if t.value is not None else math.nan
        row["epochs"] = int(job.get("epochs", 0) or 0)
        row["max_epochs"] = _max_epochs(job_dir, info)
        for key, value in job.items():
            # The job summary's own ranking is left out: a search ranks by its objective (best.txt).
            if key in ("job", "status", "epochs", "run_dir", "error", "rank", "ranked_by") or key in override_keys \
                    or key.startswith("group"):
                continue
            row[key] = value
        row["run_dir"] = job.get("run_dir") or t.user_attrs.get("run_dir", "")
        row["error"] = job.get("error", "") if row["status"] != "pruned" else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table) and "best_epoch" in table:
        table["best_epoch"] = table["best_epoch"].astype("Int64")
    return table


def _max_epochs(job_dir: Path, info: dict) -> int:
    try:
        config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        return int(config["trainer"]["max_epochs"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return int(info.get("max_epochs") or 0)


def describe(sweep_dir: Path, study, info: dict, table: pd.DataFrame) -> str:
    """best.txt: the search's totals, the best trial and the command that re-runs it."""
    name = info.get("objective", "objective")
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    parts = [f"{counts.get(s, 0)} {w}" for s, w in (("complete", "completed"), ("pruned", "pruned"),
                                                  ("fail", "failed"), ("running", "running"), ("waiting", "waiting"))
             if counts.get(s, 0) or s in ("complete", "pruned")]
    lines = [f"Search: study {study.study_name!r}, {name} ({info.get('direction', '')}), sampler "
             f"{info.get('sampler', '?')}, pruner {info.get('pruner', '?')}",
             f"Trials: {len(table)} ({', '.join(parts)})"]
    ended = table[table["state"].isin(["complete", "pruned", "fail"])] if len(table) else table
    if len(ended):
        run, budget = int(ended["epochs"].sum()), int(ended["max_epochs"].sum())
        saved = budget - run
        line = f"Epochs trained: {run} of {budget} (every trial to its last epoch)"
        if budget:
            line += f"; pruning saved {saved} epochs ({100 * saved / budget:.0f} %)"
        if "wall_seconds" in ended and saved:
            # Each stopped trial's missing epochs at that trial's own pace (batch size changes it).
            stopped = ended[(ended["epochs"] > 0) & (ended["epochs"] < ended["max_epochs"])]
            seconds = ((stopped["max_epochs"] - stopped["epochs"]) * stopped["wall_seconds"] / stopped["epochs"]).sum()
            if math.isfinite(seconds) and seconds > 0:
                line += f", about {_duration(seconds)} of training"
        lines.append(line)
    best = best_trial(study)
    if best is None:
        lines.append("Best trial: none completed yet")
        return "\n".join(lines) + "\n"
    lines.append(f"Best trial: {best.number}, {name} = {best.value:.6g}")
    lines += [f"  {k} = {v}" for k, v in best.params.items()]
    record = read_record(sweep_dir / str(best.number)) or {}
    if record.get("best_epoch") is not None and record.get("test_acc_at_best") is not None:
        lines.append(f"  selected epoch {record['best_epoch']}: validation accuracy "
                     f"{100 * record['best_val_acc']:.2f} %, test accuracy {100 * record['test_acc_at_best']:.2f} %")
    lines.append(f"  run dir: {sweep_dir / str(best.number)}")
    lines.append("Run it alone:")
    lines.append("  " + rerun_command(sweep_dir / str(best.number), best.user_attrs.get("overrides")))
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def write_search_summary(sweep_dir: Path, plots: bool = False) -> pd.DataFrame:
    """summary.csv and best.txt (and with plots, every figure) of a search's sweep dir."""
    sweep_dir = Path(sweep_dir)
    study, info = open_study(sweep_dir)
    table = search_table(sweep_dir, study, info)
    # Parallel jobs each write whole files: the last one wins.
    write_text(sweep_dir / SUMMARY_FILE, table.to_csv(index=False))
    write_text(sweep_dir / BEST_FILE, describe(sweep_dir, study, info, table))
    if plots:
        render_search(sweep_dir, study, table, info.get("objective", "objective"))
    return table


# ------------------------------------------------------------------ figures
def render_search(sweep_dir: Path, study, table: pd.DataFrame, objective: str = "objective") -> list[Path]:
    """The comparison plots (one line per trial) and the study's own figures."""
    curves = {}
    for row in table.itertuples():
        try:
            metrics = pd.read_csv(Path(sweep_dir) / str(row.trial) / METRICS_FILE)
        except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
            continue
        if len(metrics):
            curves[f"trial {row.trial}" + (" (pruned)" if row.state == "pruned" else "")] = metrics
    written = render_sweep(Path(sweep_dir), curves, None) if curves else []
    return written + render_study_figures(study, Path(sweep_dir), objective)


STUDY_FIGURES = {
    "search_history.png": ("plot_optimization_history", "objective of each trial and the best so far"),
    "search_curves.png": ("plot_intermediate_values", "objective after each epoch, pruned trials included"),
    "search_importances.png": ("plot_param_importances", "how much each parameter mattered"),
    "search_slice.png": ("plot_slice", "objective against each parameter"),
    "search_parallel.png": ("plot_parallel_coordinate", "every trial's parameters and objective"),
}


def render_study_figures(study, out: Path, objective: str = "objective") -> list[Path]:
    """Each figure that the study's trials allow; the others are skipped with a note
    (importances, for one, need two completed trials whose parameters differ)."""
    optuna = require_optuna()
    import optuna.visualization.matplotlib as vis

    written = []
    for name, (function, what) in STUDY_FIGURES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = getattr(vis, function)(study)
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            fig = first.figure
            if function in ("plot_optimization_history", "plot_intermediate_values"):
                first.set_ylabel(objective)  # Optuna's own labels say "Objective Value" / "Step"
            if function == "plot_intermediate_values":
                first.set_xlabel("epoch")
                first.set_title(f"{objective} after each epoch (pruned trials stop early)")
            if not fig.axes or not any(ax.has_data() for ax in fig.axes):
                plt.close(fig)
                log.info("Skipped %s (%s): no trial has the data it needs yet", name, what)
                continue
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(out / name)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError, optuna.exceptions.OptunaError) as err:
            plt.close("all")
            log.info("Skipped %s (%s): %s", name, what, str(err).splitlines()[0] if str(err) else type(err).__name__)
    return written
