"""From a config to what a run trains: seeds, the data on the device, the model,
the optimiser, the CPU step, the thread counts and the training options
(precision, memory format, augmentation, weight average), each decided once here.

The order is part of the contract: the random numbers a run draws (model
initialisation, the validation split is seeded apart) follow from it, so a
run and its resume compute exactly the same thing.
"""

from __future__ import annotations

import inspect
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from hydra.utils import get_object
from omegaconf import DictConfig

from cnnexp import data as datasets
from cnnexp.config.targets import instantiate_checked, optimizer_config
from cnnexp.cpu import cpu_budget, thread_plan
from cnnexp.data.augment import Augment
from cnnexp.engine.autotune import COMPILED, StepPlan, plan_cpu_step
from cnnexp.engine.ema import WeightAverage
from cnnexp.engine.kernels import CompiledStepper
from cnnexp.engine.lookahead import Lookahead
from cnnexp.engine.optimizers import FlatSGD, build_optimizer
from cnnexp.engine.precision import StepOptions
from cnnexp.engine.steppers import Engine
from cnnexp.errors import ConfigError, DataError
from cnnexp.models import adapt_first_conv
from cnnexp.run.resume import Checkpoint

log = logging.getLogger("cnnexp")


@dataclass
class Threads:
    """CPU threads and oneDNN use of the training steps and of evaluation."""

    train: int
    eval: int
    train_onednn: bool | None = None  # None: leave torch's setting alone (GPU runs)
    eval_onednn: bool | None = None

    def as_record(self) -> dict:
        return {"train": self.train, "eval": self.eval}


@dataclass
class Setup:
    data: datasets.DeviceData
    model: torch.nn.Module
    optimizer: object  # FlatSGD or TorchOptimizer (engine/optimizers.py)
    engine: Engine
    step_plan: StepPlan | None  # CPU runs only
    threads: Threads
    options: StepOptions = StepOptions()  # precision, memory format, label smoothing
    augment: Augment = Augment()  # of the training images, per epoch
    ema: WeightAverage | None = None  # trainer.ema_decay > 0
    lookahead: Lookahead | None = None  # trainer.lookahead_every > 0

    def describe_step(self) -> str:
        kind = "flat SGD" if isinstance(self.optimizer, FlatSGD) else type(self.optimizer.optimizer).__name__
        if self.step_plan is not None and self.step_plan.kernel == COMPILED:
            kind += ", compiled step"
        if self.engine.use_graph:
            kind += " in a CUDA graph"
        extras = [self.options.describe(), f"augment: {self.augment.describe()}" if self.augment.active else "",
                  f"EMA {self.ema.decay:g}" if self.ema is not None else "",
                  f"lookahead every {self.lookahead.every} steps" if self.lookahead is not None else ""]
        return ", ".join([kind, *(e for e in extras if e)])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def takes_in_channels(target: str) -> bool:
    """torchvision's classifiers take num_classes but not in_channels; cnnexp's
    models and any other _target_ are given both."""
    if not target.startswith("torchvision."):
        return True
    try:
        return "in_channels" in inspect.signature(get_object(target)).parameters
    except Exception:  # noqa: BLE001 - no signature to read: assume it cannot take it
        return False


def instantiate_model(model_cfg: DictConfig, in_channels: int, num_classes: int) -> torch.nn.Module:
    if takes_in_channels(str(model_cfg._target_)):
        return instantiate_checked(model_cfg, "model", in_channels=in_channels, num_classes=num_classes)
    model = instantiate_checked(model_cfg, "model", num_classes=num_classes)
    adapted = adapt_first_conv(model, in_channels)
    if adapted:
        log.info("Adapted %s to %d-channel images: %s", model_cfg._target_, in_channels, adapted)
    return model


def build_model(model_cfg: DictConfig, splits: datasets.ImageSplits) -> torch.nn.Module:
    model = instantiate_model(model_cfg, splits.in_channels, len(splits.classes))
    probe = splits.train_images[:1].float()
    try:
        model.eval()  # one image through batch norm in training mode fails on a 1x1 map
        with torch.no_grad():
            out = model(probe)
        model.train()
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


def build(cfg: DictConfig, device: torch.device, checkpoint: Checkpoint | None) -> Setup:
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
    check_batch_size(batch_size, data.train_x.shape[0])
    prepare_model(model, data)
    options = step_options(t_cfg)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)

    step_plan = None
    if device.type == "cpu":  # time the candidate steps (or read the cached choice) on a real batch
        step_plan = plan_cpu_step(model, optimizer_config(cfg.optim, quiet=True), t_cfg, data.train_x[:batch_size],
                                  data.train_y[:batch_size], prepare=data.normalize, num_classes=data.num_classes,
                                  budget=cpu_budget(), previous=checkpoint.step_plan if checkpoint else None,
                                  options=options)
        log.info("CPU step: %s (%s)", step_plan.label, step_plan.chosen_by)
    try:
        optimizer = build_optimizer(optimizer_config(cfg.optim), model, fast_path=t_cfg.fast_path,
                                    capturable=device.type == "cuda" and t_cfg.cuda_graph,
                                    decay_norm_and_bias=t_cfg.get("decay_norm_and_bias", True))
    except (TypeError, ValueError) as err:  # torch.optim checks its own values (eps < 0, ...)
        raise ConfigError(f"optim._target_={cfg.optim._target_!r} refused the optim.* keys: "
                          f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
    compiled = step_plan is not None and step_plan.kernel == COMPILED
    # torch.compile for the eager step only: the compiled C++ step is already one call
    step_model = torch.compile(model) if t_cfg.get("compile", False) and not compiled else model
    engine = Engine(step_model, optimizer, data.train_x.shape[0], batch_size, device, num_classes=data.num_classes,
                    cuda_graph=t_cfg.cuda_graph, prepare=data.normalize,
                    stepper_class=CompiledStepper if compiled else None, options=options)
    ema = WeightAverage(model, t_cfg.ema_decay) if t_cfg.get("ema_decay", 0) else None
    lookahead = None
    if t_cfg.get("lookahead_every", 0):
        lookahead = Lookahead(model, t_cfg.lookahead_every, t_cfg.lookahead_decay,
                              total_steps=int(t_cfg.max_epochs) * engine.steps_per_epoch)
    threads = plan_threads(t_cfg, batch_size, device, step_plan, options)
    return Setup(data, model, optimizer, engine, step_plan, threads, options, Augment.from_config(cfg.get("augment")),
                 ema, lookahead)


def step_options(t_cfg: DictConfig) -> StepOptions:
    return StepOptions(precision=str(t_cfg.get("precision", "32")), channels_last=bool(t_cfg.get("channels_last")),
                       label_smoothing=float(t_cfg.get("label_smoothing", 0.0)))


def check_batch_size(batch_size: int, n_train: int) -> None:
    if batch_size > n_train:
        raise ConfigError(f"data.batch_size={batch_size} is larger than the training set ({n_train} images); "
                          f"use data.batch_size={n_train} or less, or more training images.")


def prepare_model(model: torch.nn.Module, data: datasets.DeviceData, sample: int = 5000) -> None:
    """Models that set part of themselves from the data (Fast94Net's patch
    whitening) see the first `sample` normalised training images: no random draw."""
    if hasattr(model, "fit_to_data"):
        with torch.no_grad():
            model.fit_to_data(data.normalize(data.train_x[:sample]))


def plan_threads(t_cfg: DictConfig, batch_size: int, device: torch.device, step_plan: StepPlan | None,
                 options: StepOptions | None = None) -> Threads:
    """The one place a run's thread counts are decided: the timed step plan's
    for training where there is one, else the rule in cnnexp/cpu.py."""
    train, evaluation = thread_plan(t_cfg.num_threads, batch_size)
    # oneDNN's convolution setup costs more than it saves at the tutorial's sizes;
    # bf16 and channels_last convolutions need it.
    onednn = None if device.type != "cpu" or not t_cfg.fast_path else not (options or StepOptions()).is_plain
    if step_plan is None:
        return Threads(train, evaluation, onednn, onednn)
    return Threads(step_plan.threads, evaluation, step_plan.onednn, onednn)
