"""Where the time of a short job goes: start-up, training, and the way out.

    python benchmarks/bench_startup.py                     # 3 interleaved rounds
    python benchmarks/bench_startup.py --repeats 5 --n-train 20000
    python benchmarks/bench_startup.py --only run          # run | run_background | sweep | search

Each round runs, one after the other: `python -c "import torch"` (the
reference line), a plain run, the same run with its figures drawn in the
background (trainer.plots_in_background=true), a 4-job sweep (basic launcher)
and a 4-trial Optuna search, all on synthetic data. The wall time of each command is taken
here, outside cnnexp, from before the process starts to after it exits. The
phases inside are marked by a `sitecustomize` module put on the child's
PYTHONPATH (cnnexp itself is not changed for this): it appends a time stamp to
a file when `cnnexp.cli` has been imported, when the job starts (Hydra has
composed the config), around reading the data, around the CPU-step tuner, at
each epoch's first step and when each epoch's metrics row is written. Every
number printed is a median over the rounds.

Phases of the first job: import (process start to cnnexp.cli imported),
compose (to the job's start), checks (to reading the data), data, tuner,
first step (from the tuner to the first training step), then training, and
last epoch to exit (the last metrics row to the process exit). For sweeps and
searches also: per-job overhead, the time between one job's last metrics row
and the next job's first step in the same process (setting a job up and
finishing the previous one), and the sweep's wall time against the sum of its
jobs' training.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

from source_trees import add_tree_argument, tree_environments

# Installed as sitecustomize.py in the children: marks phases without touching cnnexp's code.
SITECUSTOMIZE = textwrap.dedent('''
    import functools
    import importlib.abc
    import importlib.util
    import os
    import sys
    import time

    _FILE = os.environ.get("CNNEXP_BENCH_MARKS")


    def mark(name):
        with open(_FILE, "a") as f:
            f.write(f"{os.getpid()} {name} {time.time():.6f}\\n")


    def around(owner, attr, before=None, after=None):
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if before:
                mark(before)
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    mark(after)

        setattr(owner, attr, wrapper)


    def job(m):
        around(m, "run_job", before="job")


    def steppers(m):
        around(m.Engine, "train_epoch", before="epoch_start")


    PATCHES = {
        "cnnexp.cli": lambda m: mark("imported"),
        "cnnexp.run.job": job,
        "cnnexp.data": lambda m: around(m, "read_splits", before="data_start", after="data_end"),
        "cnnexp.engine.autotune": lambda m: around(m, "plan_cpu_step", before="tuner_start", after="tuner_end"),
        "cnnexp.engine.steppers": steppers,
        "cnnexp.results.metrics": lambda m: around(m.MetricsCSV, "append", after="epoch_end"),
    }


    class Marker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in PATCHES:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                PATCHES[name](module)

            spec.loader.exec_module = exec_module
            return spec


    if _FILE:
        mark("python")
        sys.meta_path.insert(0, Marker())
''')

PHASES = ["import", "compose", "checks", "data", "tuner", "first step", "training", "last epoch to exit"]


def read_marks(path: Path) -> dict[int, list[tuple[str, float]]]:
    """Marks per process, in the order written."""
    by_pid = defaultdict(list)
    if path.is_file():
        for line in path.read_text().splitlines():
            pid, name, stamp = line.split()
            by_pid[int(pid)].append((name, float(stamp)))
    return by_pid


def first(marks: list[tuple[str, float]], name: str, after: float = 0.0) -> float | None:
    return next((t for n, t in marks if n == name and t >= after), None)


def phases_of(start: float, end: float, marks: dict[int, list[tuple[str, float]]]) -> dict[str, float]:
    """The first job's phases (from the earliest process that ran a job), the
    per-job overheads in every job process, and the totals."""
    every = sorted((t, n, pid) for pid, ms in marks.items() for n, t in ms)
    job_pids = [pid for pid, ms in marks.items() if any(n == "job" for n, _ in ms)]
    if not job_pids:
        return {}
    main = next(pid for _, n, pid in every if n == "imported")
    ms = marks[main]
    job_pid = min(job_pids, key=lambda pid: first(marks[pid], "job"))
    jm = marks[job_pid]
    t_job = first(jm, "job")
    points = [start, first(ms, "imported"), t_job, first(jm, "data_start", t_job), first(jm, "data_end", t_job),
              first(jm, "tuner_start", t_job), first(jm, "tuner_end", t_job), first(jm, "epoch_start", t_job)]
    out = {}
    names = ["import", "compose", "checks", "data", "", "tuner", "first step"]
    for name, a, b in zip(names, points, points[1:]):
        if name and a is not None and b is not None:
            out[name] = b - a
    if None not in (points[4], points[5]) and "checks" in out:  # the model build between data and tuner
        out["data"] += points[5] - points[4]
    out["to first step"] = points[-1] - start if points[-1] else float("nan")
    last_end = max(t for t, n, _ in every if n == "epoch_end")
    out["last epoch to exit"] = end - last_end
    out["wall"] = end - start
    # Training: each epoch's first step to its metrics row.
    training, gaps = 0.0, []
    for pid in job_pids:
        seq = [(n, t) for n, t in marks[pid] if n in ("epoch_start", "epoch_end", "job")]
        begin, prev_end = None, None
        for n, t in seq:
            if n == "epoch_start":
                if begin is None and prev_end is not None:
                    gaps.append(t - prev_end)  # from a job's last row to the next job's first step
                begin = begin if begin is not None else t
                epoch_t0 = t
            elif n == "epoch_end":
                training += t - epoch_t0
                prev_end = t
            elif n == "job":
                begin = None
    out["training"] = training
    out["jobs"] = sum(1 for pid in job_pids for n, _ in marks[pid] if n == "job")
    if gaps:
        out["per-job overhead"] = statistics.median(gaps)
    out["outside training"] = out["wall"] - training
    return out


def cpu_seconds() -> float:
    """CPU time (user + system) of the children waited for so far: on a shared
    machine a steadier measure of the work done than the wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict, cwd: Path, marks: Path) -> tuple[float, float, float]:
    """Start, end (wall clock, taken outside the process) and CPU seconds of one command."""
    marks.unlink(missing_ok=True)
    cpu, start = cpu_seconds(), time.time()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return start, end, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", choices=["run", "run_background", "sweep", "search"], action="append",
                        help="run only these scenarios (repeatable)")
    add_tree_argument(parser)
    parser.add_argument("--launcher", default="basic", choices=["basic", "joblib"],
                        help="launcher of the sweep and the search (joblib: 2 parallel jobs)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        marks = tmp / "marks.txt"
        envs = tree_environments(args.tree, [str(tmp / "site")], CNNEXP_BENCH_MARKS=str(marks))
        trees = list(envs)
        common = ["data=synthetic", f"data.n_train={args.n_train}", "data.n_test=1000",
                  f"trainer.max_epochs={args.epochs}", "trainer.progress=none"]
        launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if args.launcher == "joblib" else []
        scenarios = {
            "run": lambda d: [sys.executable, "-m", "cnnexp", *common, f"hydra.run.dir={d}"],
            # the same run, its figures drawn by a background process (trainer.plots_in_background)
            "run_background": lambda d: [sys.executable, "-m", "cnnexp", *common, f"hydra.run.dir={d}",
                                         "trainer.plots_in_background=true"],
            "sweep": lambda d: [sys.executable, "-m", "cnnexp", "-m", *common, "optim.lr=0.0005,0.001,0.002,0.005",
                                f"hydra.sweep.dir={d}", *launcher],
            "search": lambda d: [sys.executable, "-m", "cnnexp", "-m", *common, "hydra/sweeper=optuna",
                                 "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner=none",
                                 "optim.lr=tag(log, interval(1e-4, 1e-2))", f"hydra.sweep.dir={d}", *launcher],
        }
        wanted = args.only or list(scenarios)
        reference: list[float] = []
        reference_cpu: list[float] = []
        results: dict[tuple[str, str], list[dict]] = {(tree, name): [] for tree in trees for name in wanted}
        for round_ in range(args.repeats):
            start, end, cpu = timed([sys.executable, "-c", "import torch"], envs[trees[0]], tmp, marks)
            reference.append(end - start)
            reference_cpu.append(cpu)
            for name in wanted:
                for n_tree, tree in enumerate(trees):
                    out_dir = tmp / f"{name}-{n_tree}-{round_}"
                    start, end, cpu = timed(scenarios[name](out_dir), envs[tree], tmp, marks)
                    results[tree, name].append({**phases_of(start, end, read_marks(marks)), "CPU time": cpu})
            print(f"round {round_ + 1}: import torch {reference[-1]:.2f} s, " + ", ".join(
                f"{n} {results[t, n][-1].get('wall', float('nan')):.1f} s" for n in wanted for t in trees), flush=True)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    torch_s = statistics.median(reference)
    print(f"\n{cpu}, {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in load)}; "
          f"{args.n_train} synthetic images x {args.epochs} epochs per job; medians of {args.repeats} rounds; "
          f"launcher {args.launcher}")
    reference_label = 'python -c "import torch"'
    print(f"  {reference_label:28s} {torch_s:6.2f} s   (reference; CPU time {statistics.median(reference_cpu):.2f} s)")
    for tree, name in results:
        print(f"\n{name}{' (' + tree + ')' if tree else ''}:")
        keys = [*PHASES, "to first step", "per-job overhead", "outside training", "wall", "CPU time"]
        for key in keys:
            values = [r[key] for r in results[tree, name] if key in r]
            if not values:
                continue
            value = statistics.median(values)
            note = f"   (import torch + {value - torch_s:.2f} s)" if key == "to first step" else ""
            print(f"  {key:28s} {value:6.2f} s{note}")


if __name__ == "__main__":
    main()
