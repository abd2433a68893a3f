"""Sweep results: summary.csv and comparison plots in a multirun's root.

A Hydra callback keeps summary.csv current as each job ends and draws the
comparison plots when the sweep ends; `python -m cnnexp.plot SWEEP_DIR`
does the same for a sweep that failed half-way or ran on a cluster. An
Optuna search (search.yaml in the sweep dir) is summarised per trial by
search.py instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnnexp import warm_pool
from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.results.files import SEARCH_FILE, SUMMARY_FILE
from cnnexp.safeio import atomic_path

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("cnnexp")

# Hydra builds this callback at the start of every command, plain runs included:
# pandas, the figures, Optuna and the search summary are imported where a summary
# is written, so a command that writes none never pays for them.


def write_summary(sweep_dir: Path, plots: bool = False, problems: list[str] | None = None) -> pd.DataFrame:
    """summary.csv (and the comparison plots) written; a plot that cannot be drawn is
    logged, or added to `problems` when given."""
    from cnnexp.sweep.table import summarise

    sweep_dir = Path(sweep_dir)
    if (sweep_dir / SEARCH_FILE).is_file():  # an Optuna search: one row per trial (cnnexp/search.py)
        from cnnexp.sweep.search import write_search_summary

        try:
            return write_search_summary(sweep_dir, plots=plots)
        except ConfigError as err:  # optuna missing here: the plain job summary still helps
            log.warning("%s; summarising the jobs without the study.", err)
    table, curves, groups = summarise(sweep_dir)
    with atomic_path(sweep_dir / SUMMARY_FILE) as tmp:  # parallel jobs each write whole files: last one wins
        table.to_csv(tmp, index=False)
    if plots and curves:
        from cnnexp.figures import render_sweep

        try:
            render_sweep(sweep_dir, curves, groups)
        except Exception as err:  # figures are a view of summary.csv; never lose the summary over them
            note = f"Comparison plots not drawn ({err}); redraw them with: python -m cnnexp.plot {sweep_dir}"
            if problems is None:
                log.warning("%s", note)
            else:
                problems.append(note)
    return table


def sweep_outcome(sweep_dir: Path, plots: bool) -> tuple[str | None, str | None, list[str]]:
    """summary.csv and the comparison plots written at the end of a sweep; returns the
    lines to report: the best job by validation, the failed jobs, the plots not drawn.
    Plain values only: it runs in a warm worker when there is one (cnnexp/warm_pool.py)."""
    from cnnexp.sweep.table import best_by_validation_line, failed_jobs_line

    problems: list[str] = []
    table = write_summary(sweep_dir, plots=plots, problems=problems)
    return best_by_validation_line(table), failed_jobs_line(table), problems


class SweepSummaryCallback(Callback):
    """Keeps summary.csv current as jobs end; plots and reports when the sweep ends."""

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return
        try:
            write_summary(Path(hc.sweep.dir))
        except Exception as err:  # a summary must never fail the job it summarises
            log.warning("Could not update the sweep summary: %s", err)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir() or (sweep_dir / SEARCH_FILE).is_file():
            return  # an Optuna search: its sweeper has summarised, plotted and reported it
        plots = OmegaConf.select(config, "trainer.plots", default="all") != "none"
        try:  # pandas and matplotlib: in a joblib sweep's warm worker, which has them imported
            best, line, problems = warm_pool.call(sweep_outcome, sweep_dir.absolute(), plots)
        except CnnexpError as err:  # summary.csv does not fit on the disk
            print(f"cnnexp: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        for problem in problems:
            log.warning("%s", problem)
        log.info("Sweep summary: %s", sweep_dir / SUMMARY_FILE)
        if best:
            log.info("%s", best)
        if line:
            print(f"cnnexp: error: {line}", file=sys.stderr)
            raise SystemExit(1)
