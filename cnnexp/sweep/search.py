"""A hyperparameter search's results: summary.csv (one row per trial, ranked),
best.txt and the study's figures, rebuilt from the study and the job directories.

The Optuna sweeper writes `search.yaml` into the sweep dir: where the study
lives and what it optimises. Its presence makes a sweep dir a search, so the
sweep summary (sweep/summary.py), the end of the sweep and
`python -m cnnexp.plot SWEEP_DIR` all come here. Reading a search never
creates a study: a missing or damaged one is StudyUnavailable, and the
caller summarises the job directories alone.
"""

from __future__ import annotations

import logging
import math
import shlex
import warnings
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.ticker import FuncFormatter, LogLocator, PercentFormatter

from cnnexp.figures import plt, render_sweep
from cnnexp.results.files import (
    BEST_FILE,
    METRICS_FILE,
    SEARCH_FILE,
    STUDY_DB,
    STUDY_JOURNAL,
    SUMMARY_FILE,
)
from cnnexp.results.record import read_record
from cnnexp.safeio import atomic_path, write_text
from cnnexp.sweep.storage import StudyUnavailable, local_file, masked, open_storage, require_optuna
from cnnexp.sweep.table import job_dirs, job_overrides, summarise, swept_keys

log = logging.getLogger("cnnexp")
# Choices such as choice(4, 16, 64) are drawn as categories on purpose.
logging.getLogger("matplotlib.category").setLevel(logging.WARNING)


def is_search(sweep_dir: Path) -> bool:
    return (Path(sweep_dir) / SEARCH_FILE).is_file()


def write_marker(sweep_dir: Path, storage_url: str, **info) -> None:
    """search.yaml: the storage actually used (its password masked) and, for a
    study file inside the sweep dir, that file's name, so the dir can be moved."""
    sweep_dir = Path(sweep_dir).resolve()
    path = local_file(storage_url)
    inside = path is not None and path.parent == sweep_dir
    fields = {"storage": masked(storage_url), **({"storage_file": path.name} if inside else {}), **info}
    write_text(sweep_dir / SEARCH_FILE,
               "# Written by cnnexp's Optuna sweeper: where the study lives and what it optimises.\n"
               + yaml.safe_dump(fields, sort_keys=False))


def read_marker(sweep_dir: Path) -> dict:
    return yaml.safe_load((Path(sweep_dir) / SEARCH_FILE).read_text()) or {}


def storage_of(sweep_dir: Path, info: dict) -> str:
    """The storage URL search.yaml names (older ones: null means optuna.db beside it)."""
    sweep_dir = Path(sweep_dir).resolve()
    name = info.get("storage_file")
    if name == STUDY_JOURNAL:
        return f"journal:{sweep_dir / name}"
    if name or not info.get("storage"):
        return f"sqlite:///{sweep_dir / (name or STUDY_DB)}"
    return str(info["storage"])


def open_study(sweep_dir: Path):
    """(study, search.yaml's contents) of a search's sweep dir; StudyUnavailable
    (one line) when the study is missing, damaged or its database refuses."""
    optuna = require_optuna()
    info = read_marker(sweep_dir)
    url = storage_of(sweep_dir, info)
    if "***@" in url:
        raise StudyUnavailable(f"search.yaml does not keep the password of {url}: give the database's password "
                               "through its client's environment (PGPASSWORD or ~/.pgpass for PostgreSQL)")
    try:
        study = optuna.load_study(study_name=info.get("study_name", "cnnexp"), storage=open_storage(url, create=False))
        study.get_trials(deepcopy=False)  # a damaged file fails here at the latest
        return study, info
    except StudyUnavailable:
        raise
    except (KeyError, ValueError) as err:
        raise StudyUnavailable(f"{masked(url)} holds no study {info.get('study_name', 'cnnexp')!r} ({err})") from None
    except Exception as err:  # a damaged file, a database that refuses: the job dirs still tell a lot
        words = str(getattr(err, "orig", None) or err).strip().splitlines()
        raise StudyUnavailable(f"the study in {masked(url)} cannot be read "
                               f"({masked(words[0]) if words else type(err).__name__})") from None


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
    """One row per trial, best first: rank, trial, state, parameters, objective,
    epochs run, the job's results, run dir. Completed trials are ranked by the
    objective in its direction (1 is best, ties share a rank); the others follow
    unranked, in trial order."""
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
            # The job summary's own ranking is left out: a search ranks by its objective.
            if key in ("job", "status", "epochs", "run_dir", "error", "rank", "ranked_by") or key in override_keys \
                    or key.startswith("group"):
                continue
            row[key] = value
        row["run_dir"] = job.get("run_dir") or t.user_attrs.get("run_dir", "")
        row["error"] = job.get("error", "") if row["status"] != "pruned" else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    if "best_epoch" in table:
        table["best_epoch"] = table["best_epoch"].astype("Int64")
    maximize = info.get("direction") == "maximize"
    ranked = table["objective"].where(table["state"] == "complete")
    table.insert(0, "rank", ranked.rank(ascending=not maximize, method="min").astype("Int64"))
    table = table.sort_values(["rank", "trial"], na_position="last", kind="stable").reset_index(drop=True)
    return table


def _max_epochs(job_dir: Path, info: dict) -> int:
    try:
        config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        return int(config["trainer"]["max_epochs"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return int(info.get("max_epochs") or 0)


STATE_WORDS = (("complete", "completed"), ("pruned", "pruned"), ("fail", "failed"), ("running", "running"),
               ("waiting", "waiting"))


def describe(sweep_dir: Path, study, info: dict, table: pd.DataFrame) -> str:
    """best.txt: the search's totals, the best trial and the command that re-runs it."""
    name = info.get("objective", "objective")
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    parts = [f"{counts.get(s, 0)} {w}" for s, w in STATE_WORDS if counts.get(s, 0) or s in ("complete", "pruned")]
    lines = [f"Search: study {study.study_name!r}, {name} ({info.get('direction', '')}), sampler "
             f"{info.get('sampler', '?')}, pruner {info.get('pruner', '?')}",
             f"Trials: {len(table)} ({', '.join(parts)})"]
    savings = pruning_savings(table)
    if savings:
        lines.append(savings)
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


def pruning_savings(table: pd.DataFrame) -> str | None:
    """What pruning saved, counting pruned trials only (a failed trial saved nothing)."""
    if not len(table):
        return None
    finished = table[table["state"].isin(["complete", "pruned"])]
    pruned = finished[(finished["state"] == "pruned") & (finished["epochs"] < finished["max_epochs"])]
    if not len(pruned):
        return None
    run, budget = int(finished["epochs"].sum()), int(finished["max_epochs"].sum())
    saved = int((pruned["max_epochs"] - pruned["epochs"]).sum())
    line = (f"Epochs trained: {run} of {budget} (completed and pruned trials, each to its last epoch); "
            f"pruning {len(pruned)} trial(s) saved {saved} epochs ({100 * saved / budget:.0f} %)")
    if "wall_seconds" in pruned:
        # Each stopped trial's missing epochs at that trial's own pace (batch size changes it).
        stopped = pruned[pruned["epochs"] > 0]
        seconds = ((stopped["max_epochs"] - stopped["epochs"]) * stopped["wall_seconds"] / stopped["epochs"]).sum()
        if math.isfinite(seconds) and seconds > 0:
            line += f", about {_duration(seconds)} of training"
    return line


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
    for row in table.sort_values("trial").itertuples():
        try:
            metrics = pd.read_csv(Path(sweep_dir) / str(row.trial) / METRICS_FILE)
        except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
            continue
        if len(metrics):
            curves[f"trial {row.trial}" + (" (pruned)" if row.state == "pruned" else "")] = metrics
    written = render_sweep(Path(sweep_dir), curves, None) if curves else []
    return written + render_study_figures(study, Path(sweep_dir), objective)


# Importances from fewer completed trials than this (per searched parameter, and
# at least MIN_IMPORTANCE_TRIALS) are noise; the figure then says so instead.
IMPORTANCE_TRIALS_PER_PARAM = 4
MIN_IMPORTANCE_TRIALS = 8

STUDY_FIGURES = {
    "search_history.png": "objective of each trial and the best so far; pruned trials marked",
    "search_curves.png": "objective after each epoch, pruned trials included",
    "search_importances.png": "how much each parameter mattered",
    "search_slice.png": "objective against each parameter",
    "search_parallel.png": "every trial's parameters and objective",
}


def render_study_figures(study, out: Path, objective: str = "objective") -> list[Path]:
    """Each figure the study's trials allow (the others are skipped with a log
    line), in the comparison plots' units: accuracies in %."""
    optuna = require_optuna()
    trials = study.get_trials(deepcopy=False)
    units = _Units(objective)
    drawers = {"search_history.png": lambda: _history(trials, study, units),
               "search_curves.png": lambda: _curves(trials, units),
               "search_importances.png": lambda: _importances(trials, study, units),
               "search_slice.png": lambda: _optuna_figure("plot_slice", study, units),
               "search_parallel.png": lambda: _optuna_figure("plot_parallel_coordinate", study, units)}
    written = []
    for name, what in STUDY_FIGURES.items():
        try:
            fig = drawers[name]()
            if fig is None:
                log.info("Skipped %s (%s): no trial has the data it needs yet", name, what)
                continue
            written.append(_save_figure(fig, out / name))
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError, optuna.exceptions.OptunaError) as err:
            plt.close("all")
            log.info("Skipped %s (%s): %s", name, what, str(err).splitlines()[0] if str(err) else type(err).__name__)
    return written


class _Units:
    """The objective's axis: accuracies shown in %, like the comparison plots."""

    def __init__(self, objective: str):
        self.name = objective
        self.percent = objective.endswith("_acc")
        self.scale = 100.0 if self.percent else 1.0
        self.label = f"{objective} (%)" if self.percent else objective

    def apply(self, ax, axis: str = "y") -> None:
        target = ax.yaxis if axis == "y" else ax.xaxis
        if self.percent:
            target.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))


def _history(trials, study, units: _Units):
    states = require_optuna().trial.TrialState
    done = [t for t in trials if t.state == states.COMPLETE and t.value is not None]
    pruned = [t for t in trials if t.state == states.PRUNED and t.intermediate_values]
    if not done and not pruned:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if done:
        ax.scatter([t.number for t in done], [units.scale * t.value for t in done], color="tab:blue", zorder=3,
                   label="completed")
        better = max if study.direction.name == "MAXIMIZE" else min
        best, xs, ys = None, [], []
        for t in sorted(done, key=lambda t: t.number):
            best = t.value if best is None else better(best, t.value)
            xs.append(t.number)
            ys.append(units.scale * best)
        last_trial = max(t.number for t in trials)
        if xs[-1] < last_trial:  # the best so far holds to the last trial
            xs.append(last_trial)
            ys.append(ys[-1])
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.scatter([t.number for t in pruned], [units.scale * v for v in last], marker="x", color="tab:gray",
                   zorder=3, label="pruned (value when stopped)")
    ax.set(title=f"Search history: {units.name} of each trial", xlabel="trial", ylabel=units.label)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _curves(trials, units: _Units):
    states = require_optuna().trial.TrialState
    drawn = [t for t in trials if t.intermediate_values]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for t in sorted(drawn, key=lambda t: t.number):
        epochs = sorted(t.intermediate_values)
        values = [units.scale * t.intermediate_values[e] for e in epochs]
        was_pruned = t.state == states.PRUNED
        (line,) = ax.plot(epochs, values, marker="o", markersize=3, linestyle="--" if was_pruned else "-",
                          alpha=0.8, label=f"trial {t.number}" + (" (pruned)" if was_pruned else ""))
        if was_pruned:
            ax.plot(epochs[-1], values[-1], marker="x", markersize=9, color=line.get_color())
    ax.set(title=f"{units.name} after each epoch (pruned trials dashed, x where stopped)", xlabel="epoch",
           ylabel=units.label)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(drawn) <= 20:
        ax.legend(fontsize="small", ncol=2 if len(drawn) > 10 else 1)
    return fig


def _importances(trials, study, units: _Units):
    states = require_optuna().trial.TrialState
    done = [t for t in trials if t.state == states.COMPLETE]
    n_params = len({k for t in done for k in t.params}) or 1
    needed = max(MIN_IMPORTANCE_TRIALS, IMPORTANCE_TRIALS_PER_PARAM * n_params)
    if len(done) < needed:
        fig, ax = plt.subplots(figsize=(7, 2.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"Parameter importances need at least {needed} completed trials\n"
                          f"({IMPORTANCE_TRIALS_PER_PARAM} per searched parameter); this search has {len(done)}.\n"
                          "Fewer would show noise, not importance.", ha="center", va="center", fontsize=11)
        return fig
    return _optuna_figure("plot_param_importances", study, units, values_axis=None)


def _optuna_figure(function: str, study, units: _Units, values_axis: str | None = "y"):
    """One of Optuna's matplotlib figures, relabelled in our units, with readable log ticks."""
    import optuna.visualization.matplotlib as vis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = getattr(vis, function)(study, target_name=units.label) if values_axis else getattr(vis, function)(
            study)
    plots = list(axes.flat) if hasattr(axes, "flat") else [axes]  # the plots, not their colour bars
    fig = plots[0].figure
    if not fig.axes or not any(ax.has_data() for ax in fig.axes):
        plt.close(fig)
        return None
    for ax in plots:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":  # 0.001, 0.002, 0.005 rather than 10^-3 alone
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        if values_axis == "y" and function == "plot_slice" and units.percent:
            units.apply(ax)
    fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 4.2))
    return fig


def _save_figure(fig, path: Path) -> Path:
    """Write a PNG whole or not at all (a full disk leaves no 0-byte figure)."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path
