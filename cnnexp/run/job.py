"""A job's life: validate, decide fresh/resume/skip, train, record how it ended.

Exit codes of a single run: 0 done, 1 failed, 2 invalid config, 130/143
stopped by SIGINT/SIGTERM (checkpoint written). In a sweep, a failed job is
recorded and the sweep goes on; the sweep exits 1 at the end, naming it.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from cnnexp.checkpoint import CHECKPOINT_NAME, find_checkpoint, load_checkpoint
from cnnexp.errors import CnnexpError, ConfigError, DiskFull
from cnnexp.objective import from_config as objective_of
from cnnexp.objective import record_fields
from cnnexp.observers import Observers, RunObserver, StopRun
from cnnexp.optim_args import check_optimizer
from cnnexp.plots import render_run
from cnnexp.pruning import search_observers
from cnnexp.runrecord import RunRecord, read_record, versions
from cnnexp.safeio import LogFileHandler, is_disk_full
from cnnexp.tracking import build_tracking
from cnnexp.train import Interrupted, config_for_resume, thread_plan, train
from cnnexp.validate import check_writable, resolve_device, validate_config

log = logging.getLogger("cnnexp")


class SweepDirTaken(ConfigError):
    """A re-run sweep whose job directory holds a different job."""


class StopFlag:
    """Set by SIGINT/SIGTERM; the training loop finishes its step and stops."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self) -> int | None:
        return self.signum


@contextmanager
def graceful_stop(flag: StopFlag):
    def handler(signum, frame):
        if flag.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag.signum = signum
        log.warning("Stopping after the current step (signal %d); press Ctrl-C again to abort at once.", signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def error(message: str) -> None:
    log.error("error: %s", message)


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str],
            outcome: dict | None = None) -> int:
    """Run one job; returns the process exit code (0 in a sweep unless stopped).

    `outcome["objective"]` receives the value of trainer.objective for a sweeper:
    NaN when the run failed or was interrupted (see cnnexp/objective.py)."""
    outcome = {} if outcome is None else outcome
    outcome["objective"] = math.nan
    try:
        validate_config(cfg)
        check_optimizer(cfg.optim)
        checkpoint, run_dir = plan_start(cfg, run_dir, multirun, overrides)
        if checkpoint == "done":
            outcome["objective"] = _number((read_record(run_dir) or {}).get("objective_value"))
            log.info("%s already completed; skipping (delete it to run again).", run_dir)
            return 0
        if checkpoint is not None:
            cfg = config_for_resume(checkpoint["config"], cfg, overrides)
        objective_name = objective_of(cfg)
        check_writable(run_dir)
        tracking = build_tracking(cfg, run_dir, overrides, multirun,
                                  previous=read_record(run_dir) if checkpoint is not None else None)
    except SweepDirTaken as err:  # leave the other sweep's results untouched and stop
        error(str(err))
        raise SystemExit(err.exit_code) from None
    except ConfigError as err:
        error(str(err))
        if multirun:  # the sweep summary needs to know this job failed
            RunRecord(run_dir, overrides=overrides).finish("failed", error=str(err))
            return 0
        return err.exit_code

    device = resolve_device(cfg.trainer.device)
    start_record = RunRecord
    if checkpoint is not None:
        _log_into(run_dir)
        start_record = partial(RunRecord.continued, from_epoch=checkpoint["epoch"] + 1)
    record = start_record(run_dir, overrides=overrides, command=" ".join(["cnnexp", *sys.argv[1:]]),
                          device=str(device), device_name=_device_name(device), seed=cfg.trainer.seed,
                          versions=versions(),
                          threads=dict(zip(("train", "eval"), thread_plan(cfg.trainer, cfg.data.batch_size))),
                          resumed_from=str(checkpoint_path(run_dir)) if checkpoint else None)
    try:
        record.write()
    except DiskFull as err:
        error(str(err))
        return 0 if multirun else err.exit_code
    flag = StopFlag()
    selection = SelectionRecord(record, objective_name)
    if multirun and not selection.name.startswith(("best_val", "final_val")):
        log.warning("The sweep's objective %s is not measured on a validation split, so the search tunes on "
                    "what it reports; hold out images with data.val_size for an honest search.", selection.name)
    observers = Observers([EpochCounter(record), selection, *([tracking.bind(record)] if tracking else []),
                           *search_observers()])

    def finish(status: str, **fields) -> None:
        # wall_seconds: the total over every segment of the run
        if not record.finish(status, **fields):
            log.warning("run.json could not be updated to say %s (%s).", status, record.path)
        if status not in ("failed", "interrupted"):  # a sweeper must not learn from a broken run
            outcome["objective"] = _number(record.data.get("objective_value"))
        observers.on_finish(status, run_dir)

    def failed(err: CnnexpError) -> int:
        message = str(err)
        if isinstance(err, DiskFull) and checkpoint_path(run_dir).is_file():
            message += (" The rows in metrics.csv and the checkpoint of the completed epochs are kept; free some "
                        f"space, then continue with: python -m cnnexp trainer.resume={run_dir}")
        error(message)
        finish("failed", error=message)
        render_plots(run_dir)
        return 0 if multirun else err.exit_code

    try:
        with graceful_stop(flag):
            result = train(cfg, run_dir, device, flag, checkpoint=checkpoint, observers=observers,
                           on_step_plan=lambda plan: record.update(cpu_step=plan,
                                                                   threads={**record.data["threads"],
                                                                            "train": plan["threads"]}))
        render_plots(run_dir, warn=True)
        fields = record_fields(selection.name, result.rows)
        if "selected_by" in fields:
            log.info("Selected epoch %d by validation accuracy %.2f %%: test accuracy %.2f %% (model_best.pt)",
                     fields["best_epoch"], 100 * fields["best_val_acc"], 100 * fields["test_acc_at_best"])
        else:
            best = max(result.rows, key=lambda r: r["test_acc"])
            fields.update(best_test_acc=best["test_acc"], best_epoch=best["epoch"])
        finish("completed", epochs_completed=len(result.rows), final_test_acc=result.final_eval.accuracy,
               **fields)
        log.info("Done: test accuracy %.2f %% after the last epoch; %s = %.4g. Outputs in %s",
                 100 * result.final_eval.accuracy, fields["objective"], fields["objective_value"], run_dir)
        return 0
    except StopRun as stop:  # an observer ended the run as a normal outcome (a pruned trial)
        log.info("Stopped early (%s): %s", stop.status, stop)
        render_plots(run_dir)
        finish(stop.status, error=str(stop))
        return 0
    except Interrupted as stop:
        finish("interrupted", error=str(stop))
        render_plots(run_dir)
        code = 128 + stop.signum
        if stop.checkpointed:
            where = f"Stopped; checkpoint in {run_dir / CHECKPOINT_NAME}."
        else:
            where = (f"Stopped in epoch {stop.epoch}; no checkpoint was written (trainer.checkpoint=false), so "
                     f"metrics.csv keeps the {record.data.get('epochs_completed', 0)} completed epoch(s) and "
                     "the run cannot be continued.")
        if multirun:  # stop the whole sweep; re-running it continues this job
            from cnnexp.sweep import write_summary  # Hydra's end-of-job callbacks do not run now

            write_summary(run_dir.parent)
            again = "continue" if stop.checkpointed else "re-run this job from its start and continue"
            log.warning("%s To %s the sweep, run the same command with\n  hydra.sweep.dir=%s",
                        where, again, run_dir.parent)
            raise SystemExit(code) from None
        if stop.checkpointed:
            log.warning("%s Resume with:\n  python -m cnnexp trainer.resume=%s", where, run_dir)
        else:
            log.warning("%s", where)
        return code
    except KeyboardInterrupt:
        finish("interrupted", error="aborted by a second Ctrl-C (no checkpoint for this epoch)")
        return 130
    except CnnexpError as err:
        return failed(err)
    except Exception as err:
        if is_disk_full(err):  # met by a write cnnexp does not wrap itself (a library's)
            return failed(DiskFull(f"The disk is full: writing into {run_dir} failed ({err})."))
        # A bug: one line on the terminal, the traceback in the run's log.
        _log_to_file("Unexpected error:\n" + traceback.format_exc())
        error(f"unexpected {type(err).__name__}: {err} (a bug; the traceback is in {run_dir / 'cnnexp.log'})")
        finish("failed", error=f"{type(err).__name__}: {err}")
        return 0 if multirun else 1


def _log_to_file(text: str) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def render_plots(run_dir: Path, warn: bool = False) -> None:
    """Draw the run's figures as far as they can be drawn; figures never fail a run."""
    try:
        render_run(run_dir)
    except Exception as err:
        if warn:
            log.warning("Plots not drawn (%s); redraw them later with: python -m cnnexp.plot %s", err, run_dir)


class EpochCounter(RunObserver):
    """Keeps run.json's epochs_completed current, for people and sweep summaries."""

    def __init__(self, record: RunRecord):
        self.record = record

    def on_epoch(self, row: dict) -> None:
        self.record.epoch_done(row["epoch"])


class SelectionRecord(RunObserver):
    """Keeps run.json's objective and selected epoch current after every epoch,
    so a run stopped early (pruned, interrupted) still says what it reached."""

    def __init__(self, record: RunRecord, name: str):
        self.record, self.name, self.rows = record, name, []

    def on_start(self, cfg, run_dir, rows) -> None:
        self.rows = list(rows)
        if self.rows:
            self.record.update(**record_fields(self.name, self.rows))

    def on_epoch(self, row: dict) -> None:
        self.rows.append(row)
        self.record.update(**record_fields(self.name, self.rows))


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _log_into(run_dir: Path) -> None:
    """Continue the resumed run's own cnnexp.log (Hydra logs into this invocation's dir)."""
    path = run_dir / "cnnexp.log"
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        return
    handler = LogFileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_NAME


def plan_start(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]):
    """(checkpoint or None or "done", run dir to write). trainer.resume names the
    run to continue; a sweep job whose directory holds a run picks up from it."""
    if cfg.trainer.resume:
        path = find_checkpoint(str(cfg.trainer.resume))
        return load_checkpoint(path), path.parent.parent
    if not multirun:
        return None, run_dir
    record = read_record(run_dir)
    if record is None:
        return None, run_dir
    if record.get("overrides") is not None and record["overrides"] != overrides:
        raise SweepDirTaken(
            f"{run_dir} holds a job run with overrides {record['overrides']}, not {overrides}; "
            "a resumed sweep must repeat the same sweep command, or use a new hydra.sweep.dir."
        )
    if record.get("status") == "completed":
        return "done", run_dir
    if cfg.trainer.checkpoint and checkpoint_path(run_dir).is_file():  # never continue from a stale one
        log.info("Continuing %s from its last checkpoint", run_dir)
        return load_checkpoint(checkpoint_path(run_dir)), run_dir
    return None, run_dir


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()
