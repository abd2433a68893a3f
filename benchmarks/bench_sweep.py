"""Sweep throughput: Hydra's basic launcher against joblib with 2 parallel jobs.

    python benchmarks/bench_sweep.py                 # 4-job sweep, 3 interleaved rounds
    python benchmarks/bench_sweep.py --repeats 5 --n-train 20000
    python benchmarks/bench_sweep.py --tree ../old-checkout --tree .   # source trees side by side

Both launchers run the same 4-job learning-rate sweep on synthetic data, one
after the other in each round; the script prints each wall time, the medians
and the throughput ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from source_trees import add_tree_argument, tree_environments

LAUNCHERS = {
    "basic": [],
    "joblib n_jobs=2": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
}


def run_sweep(extra: list[str], args, workdir: Path, env: dict | None = None) -> float:
    sweep_dir = Path(tempfile.mkdtemp(dir=workdir))
    command = [sys.executable, "-m", "cnnexp", "-m", "data=synthetic", f"data.n_train={args.n_train}",
               "data.n_test=1000", f"trainer.max_epochs={args.epochs}", "trainer.progress=none",
               "optim.lr=0.0005,0.001,0.002,0.005", f"hydra.sweep.dir={sweep_dir}", *extra]
    start = time.perf_counter()
    subprocess.run(command, cwd=workdir, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    add_tree_argument(parser)
    args = parser.parse_args()
    envs = tree_environments(args.tree)
    trees = list(envs)
    cases = [(tree, name) for tree in trees for name in LAUNCHERS]
    times = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for tree, name in cases:
                times[tree, name].append(run_sweep(LAUNCHERS[name], args, Path(tmp), envs[tree]))
            print(f"round {round_ + 1}: " + ", ".join(f"{label(c)} {t[-1]:.1f} s" for c, t in times.items()),
                  flush=True)
    med = {case: statistics.median(t) for case, t in times.items()}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n4-job sweep, {args.n_train} images x {args.epochs} epochs per job, median of {args.repeats} "
          f"(load average {load}):")
    for case, value in med.items():
        print(f"  {label(case):40s} {value:6.1f} s   {4 / value * 60:5.2f} jobs/min")
    for tree in trees:
        ratio = med[tree, "basic"] / med[tree, "joblib n_jobs=2"]
        print(f"  throughput ratio joblib/basic{' (' + tree + ')' if tree else ''}: {ratio:.2f}x")


def label(case: tuple[str, str]) -> str:
    tree, name = case
    return f"{name} ({Path(tree).name})" if tree else name


if __name__ == "__main__":
    main()
