"""Compare runs and sweeps: one table of their headline figures, and their curves overlaid.

    python -m cnnexp.compare outputs/2026-11-30/10-01-02 multirun/2026-11-30/11-00-00
    python -m cnnexp.compare 'outputs/2026-11-30/*' --metric val_acc --out comparisons/lr

Each path is a run directory or a sweep directory (whose jobs all take part);
globs are expanded. The table (printed rounded, written in full precision to
comparison.csv) has one row per run, best first by --metric at the selected
epoch; the figures (compare_<metric>.png) overlay every run's curves.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from cnnexp.errors import CnnexpError
from cnnexp.figures import render_sweep
from cnnexp.results.files import COMPARISON_FILE
from cnnexp.safeio import write_text
from cnnexp.sweep.compare import collect, comparison_table, curves, expand, readable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnexp.compare", description=__doc__.strip().splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run or sweep directories (globs allowed)")
    parser.add_argument("--metric", default="test_acc",
                        help="the metrics.csv column to sort by, at each run's selected epoch (default: test_acc; "
                             "a *_loss sorts lowest first)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where comparison.csv and the figures go (default: comparisons/<date>/<time>)")
    args = parser.parse_args(argv)
    try:
        runs = collect(expand(args.paths))
        table = comparison_table(runs, args.metric)
        out = args.out or Path("comparisons") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / COMPARISON_FILE, table.to_csv(index=False))
        figures = render_sweep(out, curves(runs, table, args.metric), None)
    except CnnexpError as err:
        print(f"cnnexp.compare: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"cnnexp.compare: error: cannot write the comparison ({err.strerror or err}); choose another --out.",
              file=sys.stderr)
        return 1
    print(readable(table))
    print(f"\n{len(table)} runs compared by {args.metric} at the selected epoch; table: {out / COMPARISON_FILE}, "
          f"figures: {', '.join(f.name for f in figures) or 'none (no run has metrics yet)'} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
