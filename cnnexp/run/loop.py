"""The epoch loop: train an epoch, evaluate, write a metrics row and a checkpoint, tell the observers.

It keeps the original experiment's semantics: each epoch trains over every
batch of a fresh random permutation (the last partial batch included), then
evaluates on the whole test split (and the validation split, if any).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp.cpu import cpu_settings
from cnnexp.engine.evaluate import EvalResult, evaluate
from cnnexp.engine.schedules import learning_rate
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


def train(cfg: DictConfig, run_dir: Path, device: torch.device, stop_requested: Callable[[], int | None],
          checkpoint: Checkpoint | None = None, observers: Observers | None = None,
          setup: Setup | None = None) -> RunResult:
    """Train according to cfg, writing metrics.csv, checkpoints and final outputs
    into run_dir. `checkpoint` continues a run; `setup` is what run/build.py built
    (built here when not given); `stop_requested` returns a signal number once the
    user asked to stop; `observers` hear of the start, every trainer.log_every_steps
    steps and every epoch."""
    setup = setup or build(cfg, device, checkpoint)
    t_cfg, data, model, engine, threads = cfg.trainer, setup.data, setup.model, setup.engine, setup.threads
    data_order = torch.Generator().manual_seed(int(t_cfg.seed))
    at = restore(checkpoint, model, setup.optimizer, data_order)
    if at.best_model is not None:  # a stop may have come between the two writes
        atomic_torch_save(at.best_model, run_dir / BEST_MODEL_FILE)
    rows, best_model = at.rows, at.best_model
    has_val = data.val_x is not None
    metrics = MetricsCSV(run_dir / METRICS_FILE, with_val=has_val)
    metrics.rewrite(rows)  # drops any row written after the checkpoint
    n_train = data.train_x.shape[0]
    progress = Progress(t_cfg.progress, t_cfg.log_every_steps, engine.steps_per_epoch,
                        show_loss=engine.device.type == "cpu")
    log.info("Training %s on %s (%d train / %s%d test images, %d classes) for %d epochs on %s "
             "(%s; threads: %d train, %d eval)", cfg.model._target_.rsplit(".", 1)[-1], cfg.data.name, n_train,
             f"{data.val_x.shape[0]} validation / " if has_val else "", data.test_x.shape[0], data.num_classes,
             t_cfg.max_epochs, engine.device, setup.describe_step(), threads.train, threads.eval)

    observers = observers or Observers()
    observers.steps_per_epoch = engine.steps_per_epoch
    observers.on_start(cfg, run_dir, list(rows))
    observe_steps = observers.wants_steps()

    def on_progress(step: int, running_loss: Callable[[], float]) -> None:
        progress.update(step, running_loss)
        if observe_steps and step % t_cfg.log_every_steps == 0:
            observers.on_step(progress.epoch, step, running_loss())

    def evaluate_on(x: torch.Tensor, y: torch.Tensor) -> EvalResult:
        with cpu_settings(threads.eval, threads.eval_onednn):
            return evaluate(model, x, y, t_cfg.eval_batch_size, data.num_classes, data.normalize)

    def save_checkpoint(epochs_done: int, step: int = 0, order_state=None, result=None, seconds: float = 0.0):
        """A non-zero step marks a stop inside epoch epochs_done + 1."""
        rng, partial = rng_states(data_order), None
        if step:
            rng["data_order"] = order_state  # redraw the interrupted epoch's permutation on resume
            partial = {"logits": engine.stepper.logits[: result.samples].detach().cpu().clone(), "seconds": seconds}
        Checkpoint(epoch=epochs_done, step=step, model=cpu_state(model), optimizer=setup.optimizer.state_dict(),
                   rng=rng, metrics=list(rows), partial=partial, best_model=best_model,
                   step_plan=setup.step_plan.as_record() if setup.step_plan is not None else None,
                   config=OmegaConf.to_container(cfg, resolve=True)).save(run_dir)

    final_eval = None
    for epoch in range(at.epoch, t_cfg.max_epochs + 1):
        lr = learning_rate(cfg.optim.lr, t_cfg.lr_schedule, epoch, t_cfg.max_epochs)
        setup.optimizer.set_lr(lr)
        order_state = data_order.get_state()  # so a mid-epoch stop can redraw this permutation
        perm = torch.randperm(n_train, generator=data_order)
        carried = at.partial if epoch == at.epoch else None  # a resumed epoch brings its earlier steps
        first_step = at.step if epoch == at.epoch else 0
        progress.start(epoch, t_cfg.max_epochs, first_step)
        t0 = time.perf_counter() - (carried["seconds"] if carried else 0.0)
        with cpu_settings(threads.train, threads.train_onednn):
            result = engine.train_epoch(
                data.train_x, data.train_y, perm, start_step=first_step,
                prior_logits=carried["logits"] if carried else None,
                should_stop=lambda: stop_requested() is not None,
                on_progress=on_progress, progress_every=progress.every)
        train_seconds = time.perf_counter() - t0
        progress.close()

        if result.first_bad_step is not None:
            raise TrainingDiverged(
                f"The training loss became NaN or infinite at epoch {epoch}, step {result.first_bad_step + 1} "
                f"(optim.lr={cfg.optim.lr}). Metrics of the {len(rows)} completed epoch(s) are kept. "
                "Try a lower learning rate, e.g. optim.lr=" + f"{cfg.optim.lr / 10:g}."
            )
        signum = stop_requested()
        if signum is not None and result.steps < engine.steps_per_epoch:
            if t_cfg.checkpoint:
                save_checkpoint(epoch - 1, result.steps, order_state, result, train_seconds)
            raise Interrupted(signum, epoch, result.steps, checkpointed=t_cfg.checkpoint)

        final_eval = evaluate_on(data.test_x, data.test_y)
        row = {"epoch": epoch, "train_loss": result.loss_sum / engine.steps_per_epoch,
               "train_acc": result.correct / n_train}
        if has_val:
            val_eval = evaluate_on(data.val_x, data.val_y)
            row.update(val_loss=val_eval.loss, val_acc=val_eval.accuracy)
        row |= {"test_loss": final_eval.loss, "test_acc": final_eval.accuracy, "lr": lr,
                "epoch_seconds": round(time.perf_counter() - t0, 3),
                "train_samples_per_s": round(result.samples / max(train_seconds, 1e-9), 1)}
        rows.append(row)
        if has_val and selected_row(rows) is row:  # a new best on the validation split
            best_model = cpu_state(model)
            atomic_torch_save(best_model, run_dir / BEST_MODEL_FILE)
        if t_cfg.checkpoint:
            save_checkpoint(epoch)
        metrics.append(row)
        val_text = f"  val_acc {row['val_acc']:.4f}" if has_val else ""
        log.info("epoch %d/%d  train_loss %.4f  train_acc %.4f%s  test_loss %.4f  test_acc %.4f  (%.1f s)",
                 epoch, t_cfg.max_epochs, row["train_loss"], row["train_acc"], val_text, row["test_loss"],
                 row["test_acc"], row["epoch_seconds"])
        observers.on_epoch(row)
        if signum is not None:
            raise Interrupted(signum, epoch, engine.steps_per_epoch, checkpointed=t_cfg.checkpoint)

    if final_eval is None:  # resumed a run whose epochs were all done
        final_eval = evaluate_on(data.test_x, data.test_y)
    write_final_outputs(run_dir, model, data, final_eval)
    return RunResult(rows=rows, final_eval=final_eval)
