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

from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.results.files import SEARCH_FILE, SUMMARY_FILE
from cnnexp.safeio import atomic_path

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("cnnexp")

# Hydra builds this callback at the start of every command, plain runs included:
# pandas, the figures, Optuna and the search summary are imported where a summary
# is written, so a command that writes none never pays for them.


def write_summary(sweep_dir: Path, plots: bool = False) -> pd.DataFrame:
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
            log.warning("Comparison plots not drawn (%s); redraw them with: python -m cnnexp.plot %s", err, sweep_dir)
    return table


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
        from cnnexp.sweep.table import best_by_validation_line, failed_jobs_line

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir() or (sweep_dir / SEARCH_FILE).is_file():
            return  # an Optuna search: its sweeper has summarised, plotted and reported it
        plots = OmegaConf.select(config, "trainer.plots", default="all") != "none"
        try:
            table = write_summary(sweep_dir, plots=plots)
        except CnnexpError as err:  # summary.csv does not fit on the disk
            print(f"cnnexp: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        log.info("Sweep summary: %s", sweep_dir / SUMMARY_FILE)
        best = best_by_validation_line(table)
        if best:
            log.info("%s", best)
        line = failed_jobs_line(table)
        if line:
            print(f"cnnexp: error: {line}", file=sys.stderr)
            raise SystemExit(1)
