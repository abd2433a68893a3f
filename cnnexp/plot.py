"""Re-render figures from saved CSVs alone:

    python -m cnnexp.plot RUN_DIR      the run's plots/ (metrics, confusion matrix, ...)
    python -m cnnexp.plot SWEEP_DIR    every job's plots, summary.csv and the comparison plots
    python -m cnnexp.plot RUN_DIR --against-original   also test accuracy beside the original experiment's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from cnnexp.plots import plot_against_original, render_run
from cnnexp.sweep import (
    best_by_validation_line,
    failed_jobs_line,
    is_sweep_dir,
    job_dirs,
    write_summary,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnexp.plot", description=__doc__.strip().splitlines()[0])
    parser.add_argument("directory", type=Path, help="a run directory or a sweep (multirun) directory")
    parser.add_argument("--against-original", action="store_true",
                        help="add plots/test_acc_vs_original.png (the tutorial experiment's published range)")
    args = parser.parse_args(argv)
    path: Path = args.directory
    if not path.is_dir():
        print(f"cnnexp.plot: error: {path} is not a directory; give a run or sweep directory.", file=sys.stderr)
        return 2
    if (path / "metrics.csv").is_file():
        written = render_run(path)
        if args.against_original:
            metrics = pd.read_csv(path / "metrics.csv")
            written.append(plot_against_original(metrics, path / "plots" / "test_acc_vs_original.png"))
        print(f"Rendered {len(written)} figures into {path / 'plots'}")
        return 0
    if is_sweep_dir(path):
        for job in job_dirs(path):
            render_run(job)
        table = write_summary(path, plots=True)
        print(f"Summarised {len(table)} jobs into {path / 'summary.csv'} with comparison plots")
        best = best_by_validation_line(table)
        if best:
            print(best)
        line = failed_jobs_line(table)
        if line:
            print(f"note: {line}")
        return 0
    print(f"cnnexp.plot: error: {path} holds neither metrics.csv (a run) nor numbered job folders (a sweep).",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
