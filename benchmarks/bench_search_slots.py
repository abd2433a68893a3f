"""Slot idle time of a search with pruning, batch mode against worker mode, and
8 concurrent trial processes on one journal store.

    python benchmarks/bench_search_slots.py --old-tree /tmp/old   # /tmp/old: `git archive <commit> | tar -x -C /tmp/old`
    python benchmarks/bench_search_slots.py --concurrent-only

Part 1 runs the same search command (2 slots, 8 trials, the median pruner,
trials that learn and trials that cannot, interleaved) once with the source
tree given as --old-tree (a search that asks n_jobs trials, launches them as
one batch and waits for the whole batch) and once with this tree (workers
that ask for the next trial as soon as they are free). From each trial's
run.json (started_at, ended_at) it computes the slot idle time: slots x span
of the search minus the time trials ran, i.e. the slot-seconds in which a
slot held no trial. Part 2 runs a search with 8 workers (8 trial processes at
once) on one journal file and checks that every trial is in the study, once,
finished, and that no log mentions a lock error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
DATA = ["data=synthetic", "data.n_train=3000", "data.n_test=500", "trainer.device=cpu", "trainer.cpu_step=eager",
        "trainer.progress=none", "trainer.max_epochs=4"]
# Learning rates tried in this order: two that learn (the pruner's references), then
# alternately one that learns and one that cannot (pruned after its first epoch).
LRS = [0.02, 0.021, 0.022, 1e-7, 0.023, 1.1e-7, 0.024, 1.2e-7]
SEARCH = ["-m", "hydra/sweeper=optuna", "optim.lr=interval(1e-8, 0.05)",
          "hydra.sweeper.enqueue=[" + ", ".join(f"{{optim.lr: {lr}}}" for lr in LRS) + "]",
          f"hydra.sweeper.n_trials={len(LRS)}", "hydra.sweeper.pruner=median",
          "hydra.sweeper.pruner_startup_trials=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def run(tree: Path, args: list[str], cwd: Path) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cnnexp", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return out.returncode, time.perf_counter() - start, out.stderr + out.stdout


def intervals(sweep: Path) -> list[tuple[float, float, str]]:
    found = []
    for job in sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        record = json.loads((job / "run.json").read_text())
        found.append((datetime.fromisoformat(record["started_at"]).timestamp(),
                      datetime.fromisoformat(record["ended_at"]).timestamp(), record["status"]))
    return found


def idle(spans: list[tuple[float, float, str]], slots: int) -> tuple[float, float]:
    """(idle slot-seconds, span) between the first trial's start and the last one's end."""
    begin, end = min(s for s, _, _ in spans), max(e for _, e, _ in spans)
    busy = sum(e - s for s, e, _ in spans)
    return slots * (end - begin) - busy, end - begin


def part1(old_tree: Path, work: Path) -> None:
    for label, tree in (("batches (old)", old_tree), ("workers (new)", HERE)):
        cwd = work / label.split()[0]
        cwd.mkdir()
        code, wall, said = run(tree, [*SEARCH, *DATA, "hydra.sweep.dir=sweep"], cwd)
        if code != 0:
            print(said[-3000:])
            raise SystemExit(f"{label}: exit {code}")
        spans = intervals(cwd / "sweep")
        idle_s, span = idle(spans, 2)
        states = "".join("P" if s == "pruned" else "C" if s == "completed" else "?" for _, _, s in spans)
        print(f"{label:14s} wall {wall:6.1f} s  trials {states}  span {span:6.1f} s  "
              f"idle {idle_s:6.1f} slot-s ({100 * idle_s / (2 * span):4.1f} % of 2 x span)")


def part2(work: Path) -> None:
    cwd = work / "concurrent"
    cwd.mkdir()
    args = ["-m", "hydra/sweeper=optuna", "optim.lr=tag(log, interval(1e-3, 5e-2))", "data=synthetic",
            "data.n_train=400", "data.n_test=200", "trainer.device=cpu", "trainer.cpu_step=eager",
            "trainer.progress=none", "trainer.max_epochs=2", "hydra.sweeper.n_trials=24", "hydra.sweeper.n_jobs=8",
            "hydra.sweeper.pruner=none", "hydra.sweeper.storage=journal", "hydra.sweep.dir=sweep"]
    code, wall, said = run(HERE, args, cwd)
    sys.path.insert(0, str(HERE))
    import optuna

    from cnnexp.sweep.storage import open_storage

    study = optuna.load_study(study_name="cnnexp", storage=open_storage(f"journal:{cwd / 'sweep' / 'optuna.journal'}"))
    trials = study.get_trials()
    logs = "".join(p.read_text() for p in (cwd / "sweep").glob("*/cnnexp.log")) + said
    locked = sum(logs.lower().count(w) for w in ("database is locked", "lock error", "storageinternalerror"))
    states = sorted({t.state.name for t in trials})
    numbers = sorted(t.number for t in trials)
    dirs = sorted(int(p.name) for p in (cwd / "sweep").iterdir() if p.name.isdigit())
    print(f"8 workers, journal store: exit {code}, wall {wall:.1f} s, {len(trials)} trials in the study "
          f"(numbers 0-{numbers[-1]}, {len(set(numbers))} distinct), states {states}, job dirs {len(dirs)}, "
          f"lock errors in logs: {locked}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-tree", type=Path, help="a source tree of the batch-mode search")
    parser.add_argument("--concurrent-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        if not args.concurrent_only:
            if args.old_tree is None:
                raise SystemExit("--old-tree is needed for the before/after comparison")
            part1(args.old_tree.resolve(), Path(tmp))
        part2(Path(tmp))


if __name__ == "__main__":
    main()
