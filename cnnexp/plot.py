"""Re-render figures from saved CSVs alone:

    python -m cnnexp.plot RUN_DIR      the run's plots/ (metrics, confusion matrix, ...)
    python -m cnnexp.plot SWEEP_DIR    every job's plots, summary.csv and the comparison plots
    python -m cnnexp.plot RUN_DIR --against-original   also test accuracy beside the original experiment's
    python -m cnnexp.plot RUN_DIR --plots final        only plots/overview.png (trainer.plots's choices)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnexp.errors import CnnexpError
from cnnexp.figures import plot_against_original, render_run
from cnnexp.results.files import CONFUSION_FILE, METRICS_FILE, RUN_MARKERS
from cnnexp.results.metrics import read_metrics
from cnnexp.results.record import read_record
from cnnexp.sweep.summary import write_summary
from cnnexp.sweep.table import best_by_validation_line, failed_jobs_line, is_sweep_dir, job_dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnexp.plot", description=__doc__.strip().splitlines()[0])
    parser.add_argument("directory", type=Path, help="a run directory or a sweep (multirun) directory")
    parser.add_argument("--against-original", action="store_true",
                        help="add plots/test_acc_vs_original.png (the tutorial experiment's published range)")
    parser.add_argument("--plots", choices=("all", "final"), default="all",
                        help="every figure (default), or only plots/overview.png")
    args = parser.parse_args(argv)
    path: Path = args.directory
    if not path.is_dir():
        print(f"cnnexp.plot: error: {path} is not a directory; give a run or sweep directory.", file=sys.stderr)
        return 2
    try:
        if any((path / marker).exists() for marker in RUN_MARKERS):
            return plot_run(path, args.against_original, args.plots)
        if is_sweep_dir(path):
            return plot_sweep(path)
    except CnnexpError as err:  # a full disk, say
        print(f"cnnexp.plot: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"cnnexp.plot: error: cannot write into {path} ({err.strerror or err}).", file=sys.stderr)
        return 1
    print(f"cnnexp.plot: error: {path} holds neither metrics.csv (a run) nor numbered job folders (a sweep).",
          file=sys.stderr)
    return 2


def plot_run(path: Path, against_original: bool, plots: str = "all") -> int:
    problems: list[str] = []
    written = render_run(path, problems, plots=plots)
    if against_original:
        metrics, _ = read_metrics(path / METRICS_FILE)
        if metrics is not None and "test_acc" in metrics:
            written.append(plot_against_original(metrics, path / "plots" / "test_acc_vs_original.png"))
        else:
            problems.append("no test accuracy to compare with the original")
    record = read_record(path)
    if record is None:
        problems.append("no readable run.json (status unknown)")
    elif record.get("status") != "completed" and not (path / CONFUSION_FILE).is_file():
        problems.append(f"run.json says {record.get('status')}: no final results (confusion matrix, per-class "
                        "accuracy, predictions) to draw")
    print(f"Rendered {len(written)} figures into {path / 'plots'}" if written else f"Nothing to draw in {path}")
    if problems:
        print(f"note: {path}: " + "; ".join(problems))
    return 0 if written else 1


def plot_sweep(path: Path) -> int:
    for job in job_dirs(path):
        problems: list[str] = []
        render_run(job, problems)
        if problems:
            print(f"note: job {job.name}: " + "; ".join(problems))
    table = write_summary(path, plots=True)
    if not len(table):
        print(f"note: {path} has no job directories yet")
    print(f"Summarised {len(table)} jobs into {path / 'summary.csv'} with comparison plots")
    best = best_by_validation_line(table)
    if best:
        print(best)
    line = failed_jobs_line(table)
    if line:
        print(f"note: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
