"""The epoch loop: train an epoch, evaluate, write a metrics row and a checkpoint, tell the observers.

It keeps the original experiment's semantics: each epoch trains over every
batch of a fresh random permutation (the last partial batch included), then
evaluates on the whole test split (and the validation split, if any).
The options past the original experiment come in through the Setup (run/build.py):
per-step learning rates, augmentation, the weight average that is evaluated
and saved in place of the training weights, test-time augmentation, and
early stopping, which ends the run as completed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp.cpu import cpu_settings
from cnnexp.engine.early_stopping import EarlyStopping, monitored_metric
from cnnexp.engine.evaluate import EvalResult, epoch_tta, evaluate
from cnnexp.engine.schedules import Schedule
from cnnexp.errors import TrainingDiverged
from cnnexp.observers import Observers
from cnnexp.results.files import BEST_MODEL_FILE, METRICS_FILE
from cnnexp.results.metrics import MetricsCSV
from cnnexp.results.objective import selected_row
from cnnexp.run.build import Setup, build
from cnnexp.run.outputs import write_final_outputs
from cnnexp.run.progress import Progress
from cnnexp.run.resume import Checkpoint, cpu_state, restore, rng_states
from cnnexp.run.signals import Interrupted
from cnnexp.safeio import atomic_torch_save

log = logging.getLogger("cnnexp")


@dataclass
class RunResult:
    rows: list[dict]
    final_eval: EvalResult
    record_fields: dict | None = None  # more for run.json (early stopping's epoch)


def early_stopping_of(t_cfg: DictConfig, has_val: bool) -> EarlyStopping | None:
    es = t_cfg.get("early_stopping")
    if es is None or not es.patience:
        return None
    monitor = monitored_metric(es.monitor, has_val)
    if monitor.startswith("test"):
        log.warning("Early stopping watches %s: the test split then chooses when training ends, so the test "
                    "accuracy is no longer an unbiased estimate; hold out data.val_size for it.", monitor)
    return EarlyStopping(monitor, int(es.patience), float(es.min_delta))


def schedule_of(cfg: DictConfig, steps_per_epoch: int) -> Schedule:
    t_cfg = cfg.trainer
    return Schedule(float(cfg.optim.lr), t_cfg.lr_schedule, int(t_cfg.max_epochs), steps_per_epoch,
                    float(t_cfg.get("warmup_epochs", 0.0)), start=float(t_cfg.get("warmup_start_factor", 0.0)),
                    final=float(t_cfg.get("final_lr_factor", 0.0)))


def epoch_row(epoch: int, result, n_train: int, steps: int, evals: dict[str, EvalResult]) -> dict:
    """The metrics row of an epoch, in metrics.csv's column order (timing added by the caller)."""
    row = {"epoch": epoch, "train_loss": result.loss_sum / steps, "train_acc": result.correct / n_train}
    if "val" in evals:
        row.update(val_loss=evals["val"].loss, val_acc=evals["val"].accuracy)
    return row | {"test_loss": evals["test"].loss, "test_acc": evals["test"].accuracy}


def train(cfg: DictConfig, run_dir: Path, device: torch.device, stop_requested: Callable[[], int | None],
          checkpoint: Checkpoint | None = None, observers: Observers | None = None,
          setup: Setup | None = None) -> RunResult:
    """Train according to cfg, writing metrics.csv, checkpoints and final outputs
    into run_dir. `checkpoint` continues a run; `setup` is what run/build.py built
    (built here when not given); `stop_requested` returns a signal number once the
    user asked to stop; `observers` hear of the start, every trainer.log_every_steps
    steps and every epoch."""
    setup = setup or build(cfg, device, checkpoint)
    loop = EpochLoop(cfg, run_dir, setup, checkpoint, observers or Observers())
    for epoch in range(loop.at.epoch, cfg.trainer.max_epochs + 1):
        if loop.stops_early():  # also a resumed run that had stopped
            break
        result, seconds = loop.train_epoch(epoch, stop_requested)
        check_finite(result, epoch, len(loop.rows), float(cfg.optim.lr))
        signum = stop_requested()
        if signum is not None and result.steps < setup.engine.steps_per_epoch:  # stopped inside the epoch
            if cfg.trainer.checkpoint:
                loop.save_checkpoint(epoch - 1, result, seconds)
            raise Interrupted(signum, epoch, result.steps, checkpointed=cfg.trainer.checkpoint)
        loop.end_epoch(epoch, result, seconds)
        if signum is not None:
            raise Interrupted(signum, epoch, setup.engine.steps_per_epoch, checkpointed=cfg.trainer.checkpoint)
    return loop.finish()


class EpochLoop:
    """The state one run's epochs share: the data order, the metrics rows, the
    selected epoch's weights, progress and observers; train() drives it."""

    def __init__(self, cfg: DictConfig, run_dir: Path, setup: Setup, checkpoint: Checkpoint | None,
                 observers: Observers):
        self.cfg, self.t_cfg, self.run_dir, self.setup = cfg, cfg.trainer, run_dir, setup
        self.data_order = torch.Generator().manual_seed(int(self.t_cfg.seed))
        self.at = restore(checkpoint, setup.model, setup.optimizer, self.data_order)
        if checkpoint is not None and checkpoint.ema is not None and setup.ema is not None:
            setup.ema.load_state_dict(checkpoint.ema)
        if checkpoint is not None and checkpoint.lookahead is not None and setup.lookahead is not None:
            setup.lookahead.load_state_dict(checkpoint.lookahead)
        if self.at.best_model is not None:  # a stop may have come between the two writes
            atomic_torch_save(self.at.best_model, run_dir / BEST_MODEL_FILE)
        self.rows, self.best_model = self.at.rows, self.at.best_model
        self.has_val = setup.data.val_x is not None
        self.metrics = MetricsCSV(run_dir / METRICS_FILE, with_val=self.has_val)
        self.metrics.rewrite(self.rows)  # drops any row written after the checkpoint
        engine = setup.engine
        self.progress = Progress(self.t_cfg.progress, self.t_cfg.log_every_steps, engine.steps_per_epoch,
                                 show_loss=engine.device.type == "cpu")
        log_start(cfg, setup)
        self.schedule = schedule_of(cfg, engine.steps_per_epoch)
        self.stopping = early_stopping_of(self.t_cfg, self.has_val)
        self.final_eval, self.stopped_at = None, None
        self.order_state = None  # the data order before this epoch's permutation
        self.observers = observers
        observers.steps_per_epoch = engine.steps_per_epoch
        observers.on_start(cfg, run_dir, list(self.rows))
        self.observe_steps = observers.wants_steps()

    def stops_early(self) -> bool:
        if self.stopping is None or not self.stopping.should_stop(self.rows):
            return False
        self.stopped_at = log_early_stop(self.stopping, self.rows)
        return True

    def train_epoch(self, epoch: int, stop_requested: Callable[[], int | None]):
        """(the epoch's EpochResult, its seconds so far): one permutation, from where a resume left off."""
        setup, t_cfg = self.setup, self.t_cfg
        self.lr = self.schedule.at(epoch)
        setup.optimizer.set_lr(self.lr)
        self.order_state = self.data_order.get_state()  # so a mid-epoch stop can redraw this permutation
        perm = torch.randperm(setup.data.train_x.shape[0], generator=self.data_order)
        carried = self.at.partial if epoch == self.at.epoch else None  # a resumed epoch brings its earlier steps
        first_step = self.at.step if epoch == self.at.epoch else 0
        self.progress.start(epoch, t_cfg.max_epochs, first_step)
        self.t0 = time.perf_counter() - (carried["seconds"] if carried else 0.0)
        with cpu_settings(setup.threads.train, setup.threads.train_onednn):
            result = setup.engine.train_epoch(
                setup.data.train_x, setup.data.train_y, perm, start_step=first_step,
                prior_logits=carried["logits"] if carried else None,
                should_stop=lambda: stop_requested() is not None,
                on_progress=self.on_progress, progress_every=self.progress.every,
                **epoch_hooks(setup, self.schedule, epoch, int(t_cfg.seed), perm))
        seconds = time.perf_counter() - self.t0
        self.progress.close()
        return result, seconds

    def on_progress(self, step: int, running_loss: Callable[[], float]) -> None:
        self.progress.update(step, running_loss)
        if self.observe_steps and step % self.t_cfg.log_every_steps == 0:
            self.observers.on_step(self.progress.epoch, step, running_loss())

    def evaluate_on(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> EvalResult:
        setup, data = self.setup, self.setup.data
        with cpu_settings(setup.threads.eval, setup.threads.eval_onednn), weights_to_use(setup):
            return evaluate(setup.model, x, y, self.t_cfg.eval_batch_size, data.num_classes, data.normalize,
                            tta=epoch_tta(self.t_cfg, epoch), options=setup.options)

    def end_epoch(self, epoch: int, result, seconds: float) -> None:
        """Evaluate, then the row, the selected weights and the checkpoint on disk before any observer hears."""
        data = self.setup.data
        self.final_eval = self.evaluate_on(data.test_x, data.test_y, epoch)
        evals = {"test": self.final_eval,
                 **({"val": self.evaluate_on(data.val_x, data.val_y, epoch)} if self.has_val else {})}
        row = epoch_row(epoch, result, data.train_x.shape[0], self.setup.engine.steps_per_epoch, evals)
        row |= {"lr": self.lr, "epoch_seconds": round(time.perf_counter() - self.t0, 3),
                "train_samples_per_s": round(result.samples / max(seconds, 1e-9), 1)}
        self.rows.append(row)
        if self.has_val and selected_row(self.rows) is row:  # a new best on the validation split
            with weights_to_use(self.setup):
                self.best_model = cpu_state(self.setup.model)
            atomic_torch_save(self.best_model, self.run_dir / BEST_MODEL_FILE)
        if self.t_cfg.checkpoint:
            self.save_checkpoint(epoch)
        self.metrics.append(row)
        log_epoch(row, self.t_cfg.max_epochs)
        self.observers.on_epoch(row)

    def save_checkpoint(self, epochs_done: int, partial_result=None, seconds: float = 0.0) -> None:
        """With partial_result, a stop inside epoch epochs_done + 1 after its steps so far."""
        setup = self.setup
        rng, partial = rng_states(self.data_order), None
        if partial_result is not None:
            rng["data_order"] = self.order_state  # redraw the interrupted epoch's permutation on resume
            partial = {"logits": setup.engine.stepper.logits[: partial_result.samples].detach().cpu().clone(),
                       "seconds": seconds}
        Checkpoint(epoch=epochs_done, step=partial_result.steps if partial_result is not None else 0,
                   model=cpu_state(setup.model), optimizer=setup.optimizer.state_dict(), rng=rng,
                   metrics=list(self.rows), partial=partial, best_model=self.best_model,
                   step_plan=setup.step_plan.as_record() if setup.step_plan is not None else None,
                   config=OmegaConf.to_container(self.cfg, resolve=True),
                   ema=setup.ema.state_dict() if setup.ema is not None else None,
                   lookahead=setup.lookahead.state_dict() if setup.lookahead is not None else None
                   ).save(self.run_dir)

    def finish(self) -> RunResult:
        data = self.setup.data
        if self.final_eval is None:  # resumed a run whose epochs were all done
            last = int(self.rows[-1]["epoch"]) if self.rows else int(self.t_cfg.max_epochs)
            self.final_eval = self.evaluate_on(data.test_x, data.test_y, last)
        with weights_to_use(self.setup):
            write_final_outputs(self.run_dir, self.setup.model, data, self.final_eval)
        return RunResult(rows=self.rows, final_eval=self.final_eval,
                         record_fields=stop_record(self.stopping, self.stopped_at, self.rows))


def log_start(cfg: DictConfig, setup: Setup) -> None:
    data, engine, threads, t_cfg = setup.data, setup.engine, setup.threads, cfg.trainer
    has_val = data.val_x is not None
    log.info("Training %s on %s (%d train / %s%d test images, %d classes) for %d epochs on %s "
             "(%s; threads: %d train, %d eval)", cfg.model._target_.rsplit(".", 1)[-1], cfg.data.name,
             data.train_x.shape[0], f"{data.val_x.shape[0]} validation / " if has_val else "", data.test_x.shape[0],
             data.num_classes, t_cfg.max_epochs, engine.device, setup.describe_step(), threads.train, threads.eval)


def epoch_hooks(setup: Setup, schedule: Schedule, epoch: int, seed: int, perm: torch.Tensor) -> dict:
    """The options an epoch's steps take beyond the original loop: augmentation
    of the epoch's images (gathered in `perm`'s order), a rate per step, the
    weight average and lookahead after each step."""
    hooks = {}
    if setup.augment.active:
        hooks["augment"] = lambda images: setup.augment(images, seed, epoch, index=perm)
    if schedule.per_step:
        hooks["lr_at"] = lambda step: schedule.at(epoch, step)
    after = []
    if setup.ema is not None:
        after.append(setup.ema.update)
    if setup.lookahead is not None:
        after.append(setup.lookahead.after_step)
    if after:
        hooks["after_step"] = after[0] if len(after) == 1 else lambda: [f() for f in after]
    return hooks


def weights_to_use(setup: Setup):
    """The weights evaluated and saved: the weight average when there is one."""
    return setup.ema.swapped_in() if setup.ema is not None else contextlib.nullcontext()


def stop_record(stopping: EarlyStopping | None, stopped_at: int | None, rows: list[dict]) -> dict | None:
    if stopping is None:
        return None
    return {"early_stopping": {"monitor": stopping.monitor, "patience": stopping.patience,
                               "min_delta": stopping.min_delta, "stopped_at_epoch": stopped_at,
                               "best_epoch": stopping.best_epoch(rows)}}


def check_finite(result, epoch: int, completed: int, lr: float) -> None:
    if result.first_bad_step is not None:
        raise TrainingDiverged(
            f"The training loss became NaN or infinite at epoch {epoch}, step {result.first_bad_step + 1} "
            f"(optim.lr={lr}). Metrics of the {completed} completed epoch(s) are kept. "
            "Try a lower learning rate, e.g. optim.lr=" + f"{lr / 10:g}."
        )


def log_epoch(row: dict, max_epochs: int) -> None:
    val_text = f"  val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
    log.info("epoch %d/%d  train_loss %.4f  train_acc %.4f%s  test_loss %.4f  test_acc %.4f  (%.1f s)",
             row["epoch"], max_epochs, row["train_loss"], row["train_acc"], val_text, row["test_loss"],
             row["test_acc"], row["epoch_seconds"])


def log_early_stop(stopping: EarlyStopping, rows: list[dict]) -> int:
    """Say why the run ends early; the last epoch trained."""
    last = int(rows[-1]["epoch"])
    log.info("Early stopping after epoch %d: %s has not improved by more than %g since epoch %d.",
             last, stopping.monitor, stopping.min_delta, stopping.best_epoch(rows))
    return last
