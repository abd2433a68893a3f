"""Evaluation of a model on a split held as tensors: loss, accuracy, confusion matrix.

With test-time augmentation (trainer.tta) the logits are the weighted mean
over the views of data/augment.py's tta_views; `options` runs the forward
pass in the training step's precision and memory format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnexp.data.augment import tta_views
from cnnexp.engine.precision import StepOptions


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: torch.Tensor  # [true, predicted] counts, on the CPU


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, num_classes: int,
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, *, tta: str = "none",
             options: StepOptions | None = None) -> EvalResult:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], batch_size):
        batch = x[i : i + batch_size]
        if tta == "none" and (options is None or options.is_plain):
            out = model(prepare(batch) if prepare is not None else batch)
        else:
            out = _augmented_logits(model, prepare(batch) if prepare is not None else batch.float(), tta,
                                    options or StepOptions())
        target = y[i : i + batch_size]
        loss_sum += F.cross_entropy(out, target, reduction="sum")
        confusion += torch.bincount(target * num_classes + out.argmax(1), minlength=num_classes**2)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = x.shape[0]
    return EvalResult(loss=float(loss_sum) / n, accuracy=float(confusion.trace()) / n, confusion=confusion)



def epoch_tta(trainer, epoch: int | None) -> str:
    """The test-time augmentation an epoch's evaluation uses: trainer.tta in every
    epoch, or with trainer.tta_each_epoch=false in the last one only (epoch None:
    not known, trainer.tta)."""
    tta = str(trainer.get("tta", "none"))
    every = trainer.get("tta_each_epoch", True) or epoch is None or epoch == trainer.get("max_epochs")
    return tta if every else "none"


def eval_logits(model: nn.Module, batch: torch.Tensor, tta: str = "none",
                options: StepOptions | None = None) -> torch.Tensor:
    """The logits `evaluate` judges a normalised batch by, for callers outside it (cnnexp.load_run)."""
    if tta == "none" and (options is None or options.is_plain):
        return model(batch)
    return _augmented_logits(model, batch, tta, options or StepOptions())


def _augmented_logits(model: nn.Module, batch: torch.Tensor, tta: str, options: StepOptions) -> torch.Tensor:
    out = None
    for view, weight in tta_views(batch, tta):
        with options.autocast(batch.device.type):
            logits = model(options.prepare_input(view)).float() * weight
        out = logits if out is None else out + logits
    return out
