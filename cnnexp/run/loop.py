"""One training run: data in, epochs, a checkpoint and a metrics row per epoch, final outputs.

The loop keeps the original experiment's semantics: each epoch trains over
every batch of a fresh random permutation (the last partial batch included),
then evaluates on the whole test split.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp import data as datasets
from cnnexp.autotune import COMPILED, plan_cpu_step
from cnnexp.checkpoint import CHECKPOINT_NAME, atomic_torch_save, restore_rng_states, rng_states
from cnnexp.cores import cpu_budget
from cnnexp.engine import Engine, EvalResult, FlatSGD, build_optimizer, cpu_settings, evaluate
from cnnexp.errors import ConfigError, DataError, TrainingDiverged
from cnnexp.metrics import MetricsCSV
from cnnexp.objective import selected_row
from cnnexp.observers import Observers
from cnnexp.optim_args import optimizer_config
from cnnexp.outputs import BEST_MODEL_FILE, write_final_outputs
from cnnexp.targets import instantiate_checked

log = logging.getLogger("cnnexp")


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); a checkpoint has been written."""

    def __init__(self, signum: int, epoch: int, step: int, checkpointed: bool = True):
        super().__init__(f"stopped by signal {signum} in epoch {epoch} after step {step}"
                         + ("" if checkpointed else " (no checkpoint: trainer.checkpoint=false)"))
        self.signum, self.epoch, self.step = signum, epoch, step
        self.checkpointed = checkpointed  # False when trainer.checkpoint=false: nothing to resume from


@dataclass
class RunResult:
    rows: list[dict]
    final_eval: EvalResult


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(base_lr: float, schedule: str, epoch: int, max_epochs: int) -> float:
    """The learning rate for 1-based `epoch`."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max_epochs))
    return base_lr


def thread_plan(trainer_cfg: DictConfig, batch_size: int) -> tuple[int, int]:
    """(training, evaluation) CPU threads. Small-batch steps are overhead-bound
    and run fastest on one thread; evaluation at a large batch uses this job's
    share of the cores."""
    if trainer_cfg.num_threads:
        return trainer_cfg.num_threads, trainer_cfg.num_threads
    return (1 if batch_size <= 64 else cpu_budget()), cpu_budget()


def build_model(model_cfg: DictConfig, splits: datasets.ImageSplits) -> torch.nn.Module:
    model = instantiate_checked(model_cfg, "model", in_channels=splits.in_channels, num_classes=len(splits.classes))
    probe = splits.train_images[:1].float()
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as err:
        h, w = splits.image_size
        # The tutorial net's shapes are fixed for 32x32 inputs; other sizes are the usual cause.
        advice = ("Resize the images (data.resize=32 for an image folder, data.image_size=32 for synthetic data) "
                  "or choose another model."
                  if (h, w) != (32, 32) else "Check the model.* keys, or choose another model.")
        raise DataError(
            f"The model {model_cfg._target_} fails on one {h}x{w} image ({str(err).splitlines()[0]}). {advice}"
        ) from None
    if out.shape != (1, len(splits.classes)):
        raise DataError(f"The model {model_cfg._target_} returned shape {tuple(out.shape)} for one image; "
                        f"expected (1, {len(splits.classes)}).")
    return model


class Progress:
    """A tqdm bar per epoch on a terminal, plain log lines elsewhere."""

    def __init__(self, mode: str, log_every: int, steps_per_epoch: int, show_loss: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.log_every, self.total, self.show_loss = mode, log_every, steps_per_epoch, show_loss
        self.bar = None
        self.every = min(log_every, 100) if mode == "bar" else log_every

    def start(self, epoch: int, max_epochs: int, start_step: int) -> None:
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=start_step, desc=f"epoch {epoch}/{max_epochs}",
                            unit="step", leave=False, dynamic_ncols=True)
        self.epoch, self.last = epoch, start_step

    def update(self, step: int, running_loss: Callable[[], float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.last)
            if self.show_loss:
                self.bar.set_postfix(loss=f"{running_loss():.3f}", refresh=False)
        elif self.mode == "log" and step % self.log_every == 0:
            loss = f"loss {running_loss():.3f}" if self.show_loss else ""
            log.info("[epoch %d, step %5d] %s", self.epoch, step, loss)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train(cfg: DictConfig, run_dir: Path, device: torch.device, stop_requested: Callable[[], int | None],
          checkpoint: dict | None = None, observers: Observers | None = None,
          on_step_plan: Callable[[dict], None] | None = None) -> RunResult:
    """Train according to cfg, writing metrics.csv, checkpoints and final outputs into run_dir.

    `checkpoint` (from trainer.resume) continues a run; `stop_requested`
    returns a signal number once the user asked to stop; `observers` hear of
    the start, every trainer.log_every_steps steps and every epoch."""
    t_cfg = cfg.trainer
    seed_everything(t_cfg.seed)
    if t_cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    splits = datasets.read_splits(cfg.data)
    splits = datasets.split_validation(splits, cfg.data.get("val_size", 0), cfg.data.get("split_seed", 0))
    model = build_model(cfg.model, splits).to(device)
    data = datasets.to_device(splits, cfg.data, device)
    del splits

    batch_size = int(cfg.data.batch_size)
    step_plan = None
    if device.type == "cpu":  # time the candidate steps (or read the cached choice) on a real batch
        step_plan = plan_cpu_step(model, optimizer_config(cfg.optim, quiet=True), t_cfg, data.train_x[:batch_size], data.train_y[:batch_size],
                                  data.normalize, data.num_classes, cpu_budget(),
                                  previous=checkpoint.get("step_plan") if checkpoint else None)
        log.info("CPU step: %s (%s)", step_plan.label, step_plan.chosen_by)
        if on_step_plan is not None:
            on_step_plan(step_plan.as_record())
    capturable = device.type == "cuda" and t_cfg.cuda_graph
    try:
        optimizer = build_optimizer(optimizer_config(cfg.optim), model, fast_path=t_cfg.fast_path,
                                    capturable=capturable)
    except (TypeError, ValueError) as err:  # torch.optim checks its own values (eps < 0, ...)
        raise ConfigError(f"optim._target_={cfg.optim._target_!r} refused the optim.* keys: "
                          f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
    n_train = data.train_x.shape[0]
    engine = Engine(model, optimizer, n_train, batch_size, device, num_classes=data.num_classes,
                    cuda_graph=t_cfg.cuda_graph, prepare=data.normalize,
                    compiled=step_plan is not None and step_plan.kernel == COMPILED)
    data_order = torch.Generator().manual_seed(int(t_cfg.seed))

    rows: list[dict] = []
    start_epoch, start_step, partial = 1, 0, None
    has_val = data.val_x is not None
    metrics = MetricsCSV(run_dir / "metrics.csv", with_val=has_val)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_states(checkpoint["rng"], data_order)
        rows = checkpoint["metrics"]
        start_epoch, start_step = checkpoint["epoch"] + 1, checkpoint["step"]
        partial = checkpoint.get("partial")
        if checkpoint.get("best_model") is not None:  # a stop may have come between the two writes
            atomic_torch_save(checkpoint["best_model"], run_dir / BEST_MODEL_FILE)
        log.info("Resuming at epoch %d, step %d", start_epoch, start_step)
    metrics.rewrite(rows)  # drops any row written after the checkpoint

    train_threads, eval_threads = thread_plan(t_cfg, batch_size)
    # oneDNN's convolution setup costs more than it saves at these sizes.
    onednn = None if device.type != "cpu" or not t_cfg.fast_path else False
    train_onednn = onednn
    if step_plan is not None:
        train_threads, train_onednn = step_plan.threads, step_plan.onednn
    progress = Progress(t_cfg.progress, t_cfg.log_every_steps, engine.steps_per_epoch,
                        show_loss=device.type == "cpu")
    step_kind = "flat SGD" if isinstance(optimizer, FlatSGD) else type(optimizer.optimizer).__name__
    if step_plan is not None and step_plan.kernel == COMPILED:
        step_kind += ", compiled step"
    if engine.use_graph:
        step_kind += " in a CUDA graph"
    log.info("Training %s on %s (%d train / %s%d test images, %d classes) for %d epochs on %s "
             "(%s; threads: %d train, %d eval)", cfg.model._target_.rsplit(".", 1)[-1], cfg.data.name, n_train,
             f"{data.val_x.shape[0]} validation / " if has_val else "", data.test_x.shape[0], data.num_classes, t_cfg.max_epochs, device, step_kind, train_threads,
             eval_threads)

    observers = observers or Observers()
    observers.steps_per_epoch = engine.steps_per_epoch
    observers.on_start(cfg, run_dir, list(rows))
    observe_steps = observers.wants_steps()

    def on_progress(step: int, running_loss: Callable[[], float]) -> None:
        progress.update(step, running_loss)
        if observe_steps and step % t_cfg.log_every_steps == 0:
            observers.on_step(progress.epoch, step, running_loss())

    def evaluate_test_split() -> EvalResult:
        with cpu_settings(eval_threads, onednn):
            return evaluate(model, data.test_x, data.test_y, t_cfg.eval_batch_size, data.num_classes,
                            data.normalize)

    # The selected epoch's weights travel in every checkpoint, so a resume can
    # always restore model_best.pt to match the metrics rows.
    best_model = checkpoint.get("best_model") if checkpoint is not None else None
    final_eval = None
    for epoch in range(start_epoch, t_cfg.max_epochs + 1):
        lr = learning_rate(cfg.optim.lr, t_cfg.lr_schedule, epoch, t_cfg.max_epochs)
        optimizer.set_lr(lr)
        order_state = data_order.get_state()  # so a mid-epoch stop can redraw this permutation
        perm = torch.randperm(n_train, generator=data_order)
        # A resumed epoch carries the steps it had done before the stop.
        carried = partial if epoch == start_epoch else None
        first_step = start_step if epoch == start_epoch else 0
        progress.start(epoch, t_cfg.max_epochs, first_step)
        t0 = time.perf_counter() - (carried["seconds"] if carried else 0.0)
        with cpu_settings(train_threads, train_onednn):
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
                _save_checkpoint(run_dir, cfg, model, optimizer, data_order, rows, epoch - 1, result.steps,
                                 order_state, engine, result, train_seconds, best_model, step_plan=step_plan)
            raise Interrupted(signum, epoch, result.steps, checkpointed=t_cfg.checkpoint)

        final_eval = evaluate_test_split()
        row = {
            "epoch": epoch,
            "train_loss": result.loss_sum / engine.steps_per_epoch,
            "train_acc": result.correct / n_train,
        }
        if has_val:
            with cpu_settings(eval_threads, onednn):
                val_eval = evaluate(model, data.val_x, data.val_y, t_cfg.eval_batch_size, data.num_classes,
                                    data.normalize)
            row.update(val_loss=val_eval.loss, val_acc=val_eval.accuracy)
        row |= {
            "test_loss": final_eval.loss,
            "test_acc": final_eval.accuracy,
            "lr": lr,
            "epoch_seconds": round(time.perf_counter() - t0, 3),
            "train_samples_per_s": round(result.samples / max(train_seconds, 1e-9), 1),
        }
        rows.append(row)
        if has_val and selected_row(rows) is row:  # a new best on the validation split
            best_model = _cpu_state(model)
            atomic_torch_save(best_model, run_dir / BEST_MODEL_FILE)
        if t_cfg.checkpoint:
            _save_checkpoint(run_dir, cfg, model, optimizer, data_order, rows, epoch, 0, None, None, None, 0.0,
                             best_model, step_plan=step_plan)
        metrics.append(row)
        val_text = f"  val_acc {row['val_acc']:.4f}" if has_val else ""
        log.info("epoch %d/%d  train_loss %.4f  train_acc %.4f%s  test_loss %.4f  test_acc %.4f  (%.1f s)",
                 epoch, t_cfg.max_epochs, row["train_loss"], row["train_acc"], val_text, row["test_loss"],
                 row["test_acc"], row["epoch_seconds"])
        observers.on_epoch(row)
        if signum is not None:
            raise Interrupted(signum, epoch, engine.steps_per_epoch, checkpointed=t_cfg.checkpoint)

    if final_eval is None:  # resumed a run whose epochs were all done
        final_eval = evaluate_test_split()
    write_final_outputs(run_dir, model, data, final_eval)
    return RunResult(rows=rows, final_eval=final_eval)


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(run_dir, cfg, model, optimizer, data_order, rows, epochs_done, step, order_state, engine,
                     result, train_seconds, best_model=None, step_plan=None) -> None:
    """epochs_done completed epochs; a non-zero step marks a stop inside the next epoch."""
    rng = rng_states(data_order)
    partial = None
    if step:
        rng["data_order"] = order_state  # redraw the interrupted epoch's permutation on resume
        partial = {"logits": engine.stepper.logits[: result.samples].detach().cpu().clone(),
                   "seconds": train_seconds}
    state = {
        "format": 1,
        "epoch": epochs_done,
        "step": step,
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "metrics": list(rows),
        "partial": partial,
        "best_model": best_model,
        "step_plan": step_plan.as_record() if step_plan is not None else None,  # a resumed run steps alike
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_torch_save(state, run_dir / CHECKPOINT_NAME)


def config_for_resume(saved: dict, current: DictConfig, explicit_overrides: list[str]) -> DictConfig:
    """The saved run's config; the command line may change only how it runs on (epochs, device, ...)."""
    resumed = OmegaConf.create(saved)
    resumed.trainer.resume = current.trainer.resume
    changeable = ("max_epochs", "device", "num_threads", "progress", "log_every_steps", "eval_batch_size",
                  "objective", "cpu_step")  # objective: what a sweeper hears, not how the run trains
    for override in explicit_overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key.startswith("hydra") or key == "trainer.resume":
            continue
        if key.split(".")[0].split("/")[0] == "logger":  # trackers watch a run; they do not change it
            resumed.logger = current.logger
            continue
        name = key.removeprefix("trainer.")
        if key.startswith("trainer.") and name in changeable:
            resumed.trainer[name] = current.trainer[name]
        elif "/" in key or OmegaConf.select(resumed, key, default=None) != OmegaConf.select(current, key, default=None):
            raise ConfigError(
                f"{override!r} differs from the run being resumed; trainer.resume continues a run with its own "
                f"config (only trainer.{', trainer.'.join(changeable[:4])} may change). Start a new run instead."
            )
    return resumed
