"""A job's life: check the config, decide where it starts, build, train, record how it ended.

Exit codes of a single run: 0 done, 1 failed, 2 invalid config, 130/143
stopped by SIGINT/SIGTERM (checkpoint written). In a sweep, a failed job is
recorded and the sweep goes on; the sweep exits 1 at the end, naming it.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp.config.checks import resolve_device, validate_config
from cnnexp.config.targets import check_optimizer
from cnnexp.errors import CnnexpError, ConfigError, DiskFull, NotWritable
from cnnexp.figures import render_run
from cnnexp.observers import Observers, StopRun
from cnnexp.results.files import CHECKPOINT_NAME, LOG_FILE
from cnnexp.results.objective import completed_fields
from cnnexp.results.objective import from_config as objective_of
from cnnexp.results.record import RunRecord, read_record, reproduction, versions
from cnnexp.run.build import build
from cnnexp.run.loop import RunResult, train
from cnnexp.run.ownership import (
    RunDirTaken,
    SweepDirTaken,
    check_writable,
    claim_run_dir,
    override_text,
    release_run_dir,
)
from cnnexp.run.recording import EpochCounter, SelectionRecord
from cnnexp.run.resume import (
    checkpoint_path,
    config_for_resume,
    continue_log,
    continued_record,
    plan_start,
)
from cnnexp.run.signals import Interrupted, StopFlag, graceful_stop
from cnnexp.safeio import is_disk_full, not_writable_error, unwritable_path
from cnnexp.sweep.pruning import search_observers
from cnnexp.sweep.summary import write_summary
from cnnexp.tracking import build_tracking
from cnnexp.tracking.names import run_identity

log = logging.getLogger("cnnexp")


def error(message: str) -> None:
    log.error("error: %s", message)


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str],
            outcome: dict | None = None) -> int:
    """Run one job; returns the process exit code (0 in a sweep unless stopped).

    `outcome["objective"]` receives the value of trainer.objective for a sweeper:
    NaN when the run failed or was interrupted (see results/objective.py)."""
    outcome = {} if outcome is None else outcome
    outcome["objective"] = math.nan
    try:
        job = Job.prepare(cfg, run_dir, multirun, overrides, outcome)
    except (SweepDirTaken, RunDirTaken) as err:  # leave the other run's results untouched and stop
        error(str(err))
        release_run_dir(run_dir)
        raise SystemExit(err.exit_code) from None
    except ConfigError as err:
        error(str(err))
        if multirun:  # the sweep summary needs to know this job failed
            RunRecord(run_dir, overrides=overrides).finish("failed", error=str(err))
            return 0
        return err.exit_code
    if job is None:
        return 0
    try:
        return job.run()
    finally:
        release_run_dir(job.run_dir)


class Job:
    """One job from its checked config to its end, with the run.json and observers that follow it."""

    def __init__(self, cfg, run_dir, multirun, overrides, outcome, checkpoint, tracking):
        self.cfg, self.run_dir, self.multirun, self.outcome = cfg, run_dir, multirun, outcome
        self.checkpoint = checkpoint
        self.device = resolve_device(cfg.trainer.device)
        self.plots = cfg.trainer.get("plots", "all")  # a checkpoint from before trainer.plots draws all
        self.plots_in_background = bool(cfg.trainer.get("plots_in_background", False))
        self.objective = objective_of(cfg)
        fields = dict(overrides=overrides, command=" ".join(["cnnexp", *sys.argv[1:]]), device=str(self.device),
                      device_name=device_name(self.device), seed=cfg.trainer.seed, versions=versions(),
                      resumed_from=str(checkpoint_path(run_dir)) if checkpoint else None,
                      **run_identity(cfg, overrides, run_dir.parent if multirun else None),
                      reproduction=reproduction(OmegaConf.to_container(cfg), str(self.device)))
        if checkpoint is not None:
            continue_log(run_dir)
            self.record = continued_record(run_dir, from_epoch=checkpoint.epoch + 1, **fields)
        else:
            self.record = RunRecord(run_dir, **fields)
        self.observers = Observers([EpochCounter(self.record), SelectionRecord(self.record, self.objective),
                                    *([tracking.bind(self.record)] if tracking else []), *search_observers()])

    @classmethod
    def prepare(cls, cfg, run_dir, multirun, overrides, outcome) -> Job | None:
        """Every check before any work; None when a re-run sweep's job already completed."""
        validate_config(cfg)
        check_optimizer(cfg.optim)
        if not cfg.trainer.resume:  # one process at a time in a run dir, checked under the lock
            claim_run_dir(run_dir)
        start = plan_start(cfg, run_dir, multirun, overrides)
        claim_run_dir(start.run_dir)  # the resumed run's own dir (held already otherwise)
        if start.done:
            outcome["objective"] = _number((read_record(start.run_dir) or {}).get("objective_value"))
            log.info("%s already completed; skipping (delete it to run again).", start.run_dir)
            return None
        if start.checkpoint is not None:
            cfg = config_for_resume(start.checkpoint.config, cfg, overrides)
        objective_of(cfg)
        check_writable(start.run_dir)
        tracking = build_tracking(cfg, start.run_dir, overrides, multirun,
                                  previous=read_record(start.run_dir) if start.checkpoint is not None else None)
        return cls(cfg, start.run_dir, multirun, overrides, outcome, start.checkpoint, tracking)

    def run(self) -> int:
        flag = StopFlag()
        try:
            with graceful_stop(flag):
                setup = build(self.cfg, self.device, self.checkpoint)
                self.record.update(threads=setup.threads.as_record(),  # run.json's first write
                                   # what cnnexp.load_run needs to rebuild the model and name its outputs
                                   classes=setup.data.classes, input_shape=list(setup.data.test_x.shape[1:]),
                                   **({"cpu_step": setup.step_plan.as_record()} if setup.step_plan else {}))
                result = train(self.cfg, self.run_dir, self.device, flag, self.checkpoint, self.observers, setup)
            return self.completed(result)
        except StopRun as stop:  # an observer ended the run as a normal outcome (a pruned trial)
            log.info("Stopped early (%s): %s", stop.status, stop)
            render_plots(self.run_dir, plots=self.plots)
            self.finish(stop.status, error=str(stop))
            return 0
        except Interrupted as stop:
            return self.interrupted(stop)
        except KeyboardInterrupt:
            self.finish("interrupted", error="aborted by a second Ctrl-C (no checkpoint for this epoch)")
            return 130
        except CnnexpError as err:
            return self.failed(err)
        except Exception as err:
            if is_disk_full(err):  # met by a write cnnexp does not wrap itself (a library's)
                return self.failed(DiskFull(f"The disk is full: writing into {self.run_dir} failed ({err})."))
            if unwritable_path(err) is not None:  # the run dir became read-only (or forbidden) mid-run
                return self.failed(not_writable_error(self.run_dir, err))
            # A bug: one line on the terminal, the traceback in the run's log.
            _log_to_file("Unexpected error:\n" + traceback.format_exc())
            error(f"unexpected {type(err).__name__}: {err} (a bug; the traceback is in {self.run_dir / LOG_FILE})")
            self.finish("failed", error=f"{type(err).__name__}: {err}")
            return 0 if self.multirun else 1

    # ------------------------------------------------------------ how it ended
    def finish(self, status: str, **fields) -> None:
        if not self.record.finish(status, **fields):  # wall_seconds: the total over every segment
            log.warning("run.json could not be updated to say %s (%s).", status, self.record.path)
        if status not in ("failed", "interrupted"):  # a sweeper must not learn from a broken run
            self.outcome["objective"] = _number(self.record.data.get("objective_value"))
        self.observers.on_finish(status, self.run_dir)

    def completed(self, result: RunResult) -> int:
        if not (self.plots_in_background and plots_in_background(self.run_dir, self.plots)):
            render_plots(self.run_dir, warn=True, plots=self.plots)
        fields = completed_fields(self.objective, result.rows)
        if "selected_by" in fields:
            log.info("Selected epoch %d by validation accuracy %.2f %%: test accuracy %.2f %% (model_best.pt)",
                     fields["best_epoch"], 100 * fields["best_val_acc"], 100 * fields["test_acc_at_best"])
        self.finish("completed", epochs_completed=len(result.rows), final_test_acc=result.final_eval.accuracy,
                    **fields, **(result.record_fields or {}))
        log.info("Done: test accuracy %.2f %% after the last epoch; %s = %.4g. Outputs in %s",
                 100 * result.final_eval.accuracy, fields["objective"], fields["objective_value"], self.run_dir)
        return 0

    def failed(self, err: CnnexpError) -> int:
        message = str(err)
        if isinstance(err, (DiskFull, NotWritable)) and checkpoint_path(self.run_dir).is_file():
            fix = "free some space" if isinstance(err, DiskFull) else "make it writable again"
            message += (f" The rows in metrics.csv and the checkpoint of the completed epochs are kept; {fix}, "
                        f"then continue with: python -m cnnexp {override_text('trainer.resume', self.run_dir)}")
        error(message)
        self.finish("failed", error=message)
        render_plots(self.run_dir, plots=self.plots)
        return 0 if self.multirun else err.exit_code

    def interrupted(self, stop: Interrupted) -> int:
        self.finish("interrupted", error=str(stop))
        render_plots(self.run_dir, plots=self.plots)
        code = 128 + stop.signum
        if stop.checkpointed:
            where = f"Stopped; checkpoint in {self.run_dir / CHECKPOINT_NAME}."
        else:
            where = (f"Stopped in epoch {stop.epoch}; no checkpoint was written (trainer.checkpoint=false), so "
                     f"metrics.csv keeps the {self.record.data.get('epochs_completed', 0)} completed epoch(s) and "
                     "the run cannot be continued.")
        if self.multirun:  # stop the whole sweep; re-running it continues this job
            write_summary(self.run_dir.parent)  # Hydra's end-of-job callbacks do not run now
            again = "continue" if stop.checkpointed else "re-run this job from its start and continue"
            log.warning("%s To %s the sweep, run the same command with\n  %s",
                        where, again, override_text("hydra.sweep.dir", self.run_dir.parent))
            raise SystemExit(code) from None
        if stop.checkpointed:
            log.warning("%s Resume with:\n  python -m cnnexp %s", where, override_text("trainer.resume", self.run_dir))
        else:
            log.warning("%s", where)
        return code


def _log_to_file(text: str) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def render_plots(run_dir: Path, warn: bool = False, plots: str = "all") -> None:
    """Draw the run's figures (trainer.plots) as far as they can be drawn; figures never fail a run."""
    try:
        render_run(run_dir, plots=plots)
    except Exception as err:
        if warn:
            log.warning("Plots not drawn (%s); redraw them later with: python -m cnnexp.plot %s", err, run_dir)


def plots_in_background(run_dir: Path, plots: str) -> bool:
    """Start `python -m cnnexp.plot` on the run, detached, so the command returns
    without waiting for its figures (trainer.plots_in_background); its output
    goes on in the run's log. False when it cannot start, or under SLURM (which
    ends a job's processes with the job): then they are drawn here."""
    if plots == "none":
        return True
    if "SLURM_JOB_ID" in os.environ:
        return False
    try:
        with open(run_dir / LOG_FILE, "ab") as log_file:
            subprocess.Popen([sys.executable, "-m", "cnnexp.plot", str(run_dir), "--plots", plots],
                             stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                             start_new_session=True)  # a Ctrl-C after the command returned does not reach it
    except OSError as err:
        log.warning("Could not draw the figures in the background (%s); drawing them now.", err)
        return False
    log.info("The figures are being drawn in the background into %s", run_dir / "plots")
    return True


def _number(value) -> float:
    return math.nan if value is None else float(value)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
