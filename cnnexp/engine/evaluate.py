"""Evaluation of a model on a split held as tensors: loss, accuracy, confusion matrix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: torch.Tensor  # [true, predicted] counts, on the CPU


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, num_classes: int,
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalResult:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], batch_size):
        batch = x[i : i + batch_size]
        out = model(prepare(batch) if prepare is not None else batch)
        target = y[i : i + batch_size]
        loss_sum += F.cross_entropy(out, target, reduction="sum")
        confusion += torch.bincount(target * num_classes + out.argmax(1), minlength=num_classes**2)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = x.shape[0]
    return EvalResult(loss=float(loss_sum) / n, accuracy=float(confusion.trace()) / n, confusion=confusion)

