"""Choosing the CPU training step by timing the candidates on the machine that runs.

Which step is fastest at small batch depends on the CPU: one thread or two,
oneDNN convolutions on or off, the eager engine or the compiled step. So at
the start of a CPU run each candidate trains a copy of the actual model on a
real batch for a fraction of a second, interleaved, and the fastest (median)
wins. The choice is cached per CPU model, model, batch shape, optimiser,
torch version and core budget in the user cache dir, so later runs and
sweep jobs start at once. trainer.num_threads, when set, fixes the thread
count and skips the timing.

The timing never takes much more than TIME_LIMIT seconds: only candidates
that can apply are timed, and where the answer is known it is not timed at
all: a step with a lot of work per call (a large batch or large images, or
one measured step slower than SLOW_STEP) on a model the compiled step cannot
run goes to every core with oneDNN, which is where large convolutions are
fastest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cnnexp.cpu import cache_dir, cpu_model, cpu_settings
from cnnexp.engine.kernels import CompiledStepper, unsupported_reason
from cnnexp.engine.optimizers import SGD_TARGETS, build_optimizer
from cnnexp.engine.precision import StepOptions
from cnnexp.engine.steppers import Stepper
from cnnexp.errors import DiskFull
from cnnexp.safeio import write_text

log = logging.getLogger("cnnexp")

CACHE_FORMAT = 1
EAGER, COMPILED = "eager", "compiled"
TIME_LIMIT = 2.0  # seconds the timing may take, warm-up included
LARGE_STEP = 64 * 32 * 32  # images x pixels per step from which the answer is known (batch 64 at 32x32)
SLOW_STEP = 0.1  # seconds of one single-thread step with enough work for every core and oneDNN


@dataclass
class StepPlan:
    """How the CPU training step runs: `kernel` eager or compiled, on
    `threads` threads, with oneDNN on or off."""

    threads: int
    onednn: bool = False
    kernel: str = EAGER
    chosen_by: str = "measured"  # measured | cache | config
    ms_per_step: dict[str, float] = field(default_factory=dict)  # every candidate timed

    @property
    def label(self) -> str:
        return candidate_label(self.kernel, self.threads, self.onednn)

    def as_record(self) -> dict:
        return asdict(self)


def candidate_label(kernel: str, threads: int, onednn: bool) -> str:
    return f"{kernel}, {threads} thread{'s' if threads > 1 else ''}" + (", oneDNN" if onednn else "")


@dataclass
class Candidate:
    kernel: str
    threads: int
    onednn: bool
    make_step: Callable[[], Callable[[], None]]  # builds a scratch trainer; returns one step

    @property
    def label(self) -> str:
        return candidate_label(self.kernel, self.threads, self.onednn)


def plan_key(model: torch.nn.Module, batch_shape: tuple, optimizer: str, budget: int, kernels: list[str]) -> str:
    """What the fastest step depends on, hashed: the machine, the model's
    code and shapes, the batch, the optimiser, torch and the core budget."""
    model_id = f"{type(model).__module__}.{type(model).__qualname__}\n{model}\n" + ",".join(
        f"{tuple(p.shape)}" for p in model.parameters())
    parts = {"cpu": cpu_model(), "torch": torch.__version__, "model": model_id, "batch": list(batch_shape),
             "optimizer": optimizer, "cores": budget, "kernels": sorted(kernels)}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_cache(path: Path) -> dict:
    """The cached choices; an unreadable or foreign file counts as empty."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("plans"), dict):
        return {}
    return data


def write_cache(path: Path, key: str, plan: StepPlan) -> None:
    """Add one choice, atomically (parallel sweep jobs may write at once)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = read_cache(path) or {"format": CACHE_FORMAT, "plans": {}}
        data["plans"][key] = {"threads": plan.threads, "onednn": plan.onednn, "kernel": plan.kernel,
                              "ms_per_step": plan.ms_per_step, "cpu": cpu_model(), "torch": torch.__version__}
        write_text(path, json.dumps(data, indent=1) + "\n")  # no temp file left if it fails
    except (OSError, DiskFull) as err:  # a read-only home costs the next run a re-timing, nothing more
        log.warning("Could not cache the step choice in %s (%s)", path, err)


def cached_plan(path: Path, key: str, candidates: list[Candidate]) -> StepPlan | None:
    entry = read_cache(path)["plans"].get(key) if read_cache(path) else None
    try:
        wanted = (entry["kernel"], int(entry["threads"]), bool(entry["onednn"]))
        if wanted in {(c.kernel, c.threads, c.onednn) for c in candidates}:
            return StepPlan(threads=wanted[1], onednn=wanted[2], kernel=wanted[0], chosen_by="cache",
                            ms_per_step=dict(entry.get("ms_per_step") or {}))
    except (TypeError, KeyError, ValueError):
        pass
    return None


def time_candidates(candidates: list[Candidate], seconds: float = 1.5, rounds: int = 3,
                    limit: float = TIME_LIMIT) -> dict[str, float]:
    """Median ms per step of each candidate, rounds interleaved so that load
    from other processes hits every candidate alike. After the first round,
    candidates more than twice as slow as the best are not timed again (a
    thread count that fights another process for a core can be 50x slower).
    A candidate that fails is left out. Past `limit` seconds the rounds stop
    (each candidate timed at least once), and when single steps are slow
    (over limit / 20) the candidates not warmed up yet are left out as well:
    a busy machine slows every step alike, a large step only itself."""
    deadline = time.perf_counter() + limit
    steps, times, slowest_warm_step = {}, {}, 0.0
    for c in candidates:
        if steps and time.perf_counter() > deadline and slowest_warm_step > limit / 20:
            log.info("Step candidate %s not timed (the timing's %.0f s are spent)", c.label, limit)
            continue
        try:
            with cpu_settings(c.threads, c.onednn):
                step = c.make_step()
                started = time.perf_counter()
                step()  # warm-up: allocations, first-call setup; two more where steps are quick
                first = time.perf_counter() - started
                if first < limit / 20:
                    step()
                    step()
                slowest_warm_step = max(slowest_warm_step, first)
            steps[c.label], times[c.label] = (c, step), []
        except Exception as err:  # noqa: BLE001 - a candidate that cannot run is simply not chosen
            log.warning("Step candidate %s failed (%s); not using it", c.label, err)
    if not steps:  # every candidate failed: the run meets (and reports) the model's own error
        return {}
    slot = seconds / max(1, rounds * len(steps))
    for round_ in range(rounds):
        if round_ > 0 and time.perf_counter() > deadline:
            break
        if round_ == 1:
            best = min(t[0] for t in times.values())
            steps = {label: s for label, s in steps.items() if times[label][0] <= 2 * best}
        for label, (c, step) in steps.items():
            with cpu_settings(c.threads, c.onednn):
                n, start = 0, time.perf_counter()
                while True:
                    step()
                    n += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= slot:
                        break
            times[label].append(1e3 * elapsed / n)
    return {label: round(statistics.median(t), 4) for label, t in times.items()}


def choose(candidates: list[Candidate], key: str, cache_file: Path | None = None, seconds: float = 1.5) -> StepPlan:
    """The cached choice for `key` if there is one, else the fastest candidate, timed now."""
    cache_file = cache_file or cache_dir() / "step_plans.json"
    plan = cached_plan(cache_file, key, candidates)
    if plan is not None:
        return plan
    if len(candidates) == 1:
        only = candidates[0]
        return StepPlan(threads=only.threads, onednn=only.onednn, kernel=only.kernel, chosen_by="config")
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # timing must not shift the run's random numbers
        ms = time_candidates(candidates, seconds)
    if not ms:  # building the optimiser itself failed: the run reports that, not the timing
        first = candidates[0]
        return StepPlan(threads=first.threads, onednn=first.onednn, kernel=first.kernel, chosen_by="default")
    best = min(ms, key=ms.get)
    winner = next(c for c in candidates if c.label == best)
    plan = StepPlan(threads=winner.threads, onednn=winner.onednn, kernel=winner.kernel, ms_per_step=ms)
    log.info("Timed %d CPU step candidates in %.1f s: %s", len(ms), time.perf_counter() - started,
             ", ".join(f"{label} {t:.3f} ms" for label, t in sorted(ms.items(), key=lambda kv: kv[1])))
    write_cache(cache_file, key, plan)
    return plan


def scratch_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy to time steps on, so timing never touches the run's weights."""
    return copy.deepcopy(model)


# ----------------------------------------------------------------- a run's CPU step
def thread_counts(budget: int) -> list[int]:
    """1, 2, 4, ... up to the budget, and the budget itself."""
    counts, n = [], 1
    while n < budget:
        counts.append(n)
        n *= 2
    return counts + [budget]


def plan_cpu_step(model: torch.nn.Module, optim_cfg, trainer_cfg, x: torch.Tensor, y: torch.Tensor, *, prepare,
                  num_classes: int, budget: int, previous: dict | None = None,
                  cache_file: Path | None = None, seconds: float = 1.5,
                  options: StepOptions | None = None) -> StepPlan:
    """The step a CPU run trains with. `x`, `y` is one real training batch;
    `previous` is the plan a resumed run started with (kept, so that the
    resumed run computes exactly what it would have computed); `options` the
    step's precision, memory format and loss."""
    options = options or StepOptions()
    flat_sgd = trainer_cfg.fast_path and optim_cfg._target_ in SGD_TARGETS
    wanted = trainer_cfg.get("cpu_step", "auto")
    decay_all = trainer_cfg.get("decay_norm_and_bias", True)
    compiled_problem = "trainer.cpu_step=eager" if wanted == EAGER else (
        options_problem(options, trainer_cfg) or compiled_step_problem(model, optim_cfg, flat_sgd, x))
    if wanted == COMPILED and compiled_problem:
        log.info("The compiled step cannot run this model (%s); using the eager step", compiled_problem)
    if not trainer_cfg.fast_path:  # the plain torch.optim path, as PyTorch sets it up
        return StepPlan(threads=trainer_cfg.num_threads or 1, onednn=torch.backends.mkldnn.enabled,
                        chosen_by="config")
    if previous is not None and previous.get("kernel") in (EAGER, COMPILED) and not trainer_cfg.num_threads:
        kernel = previous["kernel"] if previous["kernel"] == EAGER or not compiled_problem else EAGER
        return StepPlan(threads=int(previous["threads"]), onednn=bool(previous["onednn"]), kernel=kernel,
                        chosen_by="checkpoint")

    def eager(threads: int, onednn: bool) -> Candidate:
        def make_step():
            scratch = scratch_copy(model)
            optimizer = build_optimizer(optim_cfg, scratch, fast_path=True, decay_norm_and_bias=decay_all)
            stepper = Stepper(scratch, optimizer, x.shape[0], num_classes, x.shape[0], x.device, prepare,
                              options=options)
            return lambda: stepper.step(x, y, row=0)

        return Candidate(EAGER, threads, onednn, make_step)

    def compiled() -> Candidate:
        def make_step():
            scratch = scratch_copy(model)
            stepper = CompiledStepper(scratch, build_optimizer(optim_cfg, scratch, fast_path=True), x.shape[0],
                                      num_classes, x.shape[0], x.device, prepare)
            return lambda: stepper.step(x, y, row=0)

        return Candidate(COMPILED, 1, False, make_step)

    if trainer_cfg.num_threads:  # fixed by the user: nothing to time
        use_compiled = wanted == COMPILED and not compiled_problem and trainer_cfg.num_threads == 1
        # bf16 and channels_last convolutions run through oneDNN; the plain float32 step is faster without it
        onednn = not options.is_plain and torch.backends.mkldnn.is_available()
        return StepPlan(threads=trainer_cfg.num_threads, onednn=onednn, kernel=COMPILED if use_compiled else EAGER,
                        chosen_by="config")
    if compiled_problem and x.shape[0] * x[0, 0].numel() >= LARGE_STEP:
        # Plenty of work per step: every core and oneDNN's convolutions; timing would cost more than it tells.
        return StepPlan(threads=budget, onednn=torch.backends.mkldnn.is_available(), kernel=EAGER,
                        chosen_by="known (large step)")
    candidates = []
    if wanted != COMPILED or compiled_problem:
        onednn_options = [False, True] if torch.backends.mkldnn.is_available() else [False]
        candidates = [eager(t, o) for t in thread_counts(budget) for o in onednn_options]
    if not compiled_problem:
        candidates.append(compiled())
    elif wanted == "auto":
        log.info("Compiled CPU step not used: %s", compiled_problem)
    optimizer_id = "flat SGD" if flat_sgd else optim_cfg._target_
    if not options.is_plain:
        optimizer_id += f" {options}"
    key = plan_key(model, tuple(x.shape), optimizer_id, budget, sorted({c.kernel for c in candidates}))
    if compiled_problem and len(candidates) > 1:
        cache_file = cache_file or cache_dir() / "step_plans.json"
        if cached_plan(cache_file, key, candidates) is None:
            # one thread measures the work; more threads would also measure other processes' load
            step_seconds = one_step_seconds(candidates[0])
            if step_seconds is not None and step_seconds > SLOW_STEP:
                plan = StepPlan(threads=budget, onednn=torch.backends.mkldnn.is_available(), kernel=EAGER,
                                chosen_by=f"known (a 1-thread step takes {1e3 * step_seconds:.0f} ms)")
                write_cache(cache_file, key, plan)
                return plan
    return choose(candidates, key, cache_file, seconds)


def one_step_seconds(candidate: Candidate) -> float | None:
    """Seconds of a candidate's first step (its setup included: an upper bound); None if it fails."""
    try:
        with torch.random.fork_rng(devices=[]), cpu_settings(candidate.threads, candidate.onednn):
            step = candidate.make_step()
            started = time.perf_counter()
            step()
            return time.perf_counter() - started
    except Exception:  # noqa: BLE001 - the timing proper reports a candidate that cannot run
        return None


def options_problem(options: StepOptions, trainer_cfg) -> str | None:
    """Which step option the compiled step (float32 SGD, plain cross-entropy) does not do, or None."""
    if options.precision != "32":
        return f"trainer.precision={options.precision}"
    if options.channels_last:
        return "trainer.channels_last=true"
    if options.label_smoothing:
        return "trainer.label_smoothing"
    if not trainer_cfg.get("decay_norm_and_bias", True):
        return "trainer.decay_norm_and_bias=false"
    if trainer_cfg.get("compile", False):
        return "trainer.compile=true"
    return None


def compiled_step_problem(model: torch.nn.Module, optim_cfg, flat_sgd: bool, x: torch.Tensor) -> str | None:
    """Why the compiled step cannot train this model, or None if it can."""
    if not flat_sgd:
        return f"the optimiser is {optim_cfg._target_} (the compiled step does SGD)"
    return unsupported_reason(model, x)
