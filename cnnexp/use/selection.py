"""`--best`: the job a sweep's or a search's own ranking selected.

A search (search.yaml in the sweep dir) selects by its objective: the study's
best trial, the one best.txt names. A grid sweep ranks its jobs by
validation accuracy (sweep/table.py, the ranking summary.csv shows); a sweep
without a validation split ranks nothing, since choosing by the test split
is what a validation split is for, so `--best` refuses it.
"""

from __future__ import annotations

from pathlib import Path

from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.sweep.search import best_trial, is_search, open_study
from cnnexp.sweep.table import is_sweep_dir, ranked_first, summarise


def best_job(sweep_dir: Path) -> tuple[Path, str]:
    """(the selected job's directory, how it was selected)."""
    sweep_dir = Path(sweep_dir).expanduser()
    if not sweep_dir.is_dir() or not is_sweep_dir(sweep_dir):
        raise ConfigError(f"--best needs a sweep or search directory (multirun/<date>/<time>); {sweep_dir} is not "
                          "one. Give a run directory without --best.")
    if is_search(sweep_dir):
        return _best_trial(sweep_dir)
    table, _, _ = summarise(sweep_dir)
    best = ranked_first(table)
    if best is None:
        raise ConfigError(f"{sweep_dir}: the sweep's jobs have no validation split, so the sweep ranks none of them "
                          "(summary.csv); give a job directory instead, or train with data.val_size to rank.")
    how = f"ranked first by {best['ranked_by']} ({best['best_val_acc']:.4f})"
    return Path(best["run_dir"]), f"job {best['job']} of {sweep_dir}, {how}"


def _best_trial(sweep_dir: Path) -> tuple[Path, str]:
    try:
        study, info = open_study(sweep_dir)
    except CnnexpError:
        raise
    except Exception as err:  # a moved or damaged study database
        raise ConfigError(f"{sweep_dir}: the search's study cannot be opened ({str(err).splitlines()[0]}).") from None
    best = best_trial(study)
    if best is None:
        raise ConfigError(f"{sweep_dir}: the search has no completed trial yet.")
    objective = info.get("objective", "objective")
    return sweep_dir / str(best.number), f"trial {best.number} of {sweep_dir}, best by {objective} ({best.value:.4g})"
