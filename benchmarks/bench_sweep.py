"""Sweep throughput: Hydra's basic launcher against joblib with 2 parallel jobs.

    python benchmarks/bench_sweep.py                 # 4-job sweep, 3 interleaved rounds
    python benchmarks/bench_sweep.py --repeats 5 --n-train 20000

Both launchers run the same 4-job learning-rate sweep on synthetic data, one
after the other in each round; the script prints each wall time, the medians
and the throughput ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCHERS = {
    "basic": [],
    "joblib n_jobs=2": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
}


def run_sweep(extra: list[str], args, workdir: Path) -> float:
    sweep_dir = Path(tempfile.mkdtemp(dir=workdir))
    command = [sys.executable, "-m", "cnnexp", "-m", "data=synthetic", f"data.n_train={args.n_train}",
               "data.n_test=1000", f"trainer.max_epochs={args.epochs}", "trainer.progress=none",
               "optim.lr=0.0005,0.001,0.002,0.005", f"hydra.sweep.dir={sweep_dir}", *extra]
    start = time.perf_counter()
    subprocess.run(command, cwd=workdir, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    times = {name: [] for name in LAUNCHERS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for name, extra in LAUNCHERS.items():
                times[name].append(run_sweep(extra, args, Path(tmp)))
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()), flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n4-job sweep, {args.n_train} images x {args.epochs} epochs per job, median of {args.repeats}:")
    for name, value in med.items():
        print(f"  {name:16s} {value:6.1f} s   {4 / value * 60:5.2f} jobs/min")
    print(f"  throughput ratio joblib/basic: {med['basic'] / med['joblib n_jobs=2']:.2f}x")


if __name__ == "__main__":
    main()
