"""A finished run's files besides metrics.csv: weights, per-class results and
the inputs of the figures, so every plot can be re-rendered without the data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from cnnexp.data import DeviceData
from cnnexp.engine.evaluate import EvalResult
from cnnexp.results.files import CONFUSION_FILE, MODEL_FILE, PER_CLASS_FILE, SAMPLES_FILE
from cnnexp.safeio import atomic_path


def write_final_outputs(run_dir: Path, model: torch.nn.Module, data: DeviceData, final_eval: EvalResult,
                        n_samples: int = 32) -> None:
    with atomic_path(run_dir / MODEL_FILE) as tmp, open(tmp, "wb") as f:
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, f)
    write_per_class(run_dir / PER_CLASS_FILE, final_eval.confusion, data.classes)
    write_confusion(run_dir / CONFUSION_FILE, final_eval.confusion, data.classes)
    with torch.inference_mode():
        model.eval()
        # Evenly spaced through the test set, so a class-sorted set shows every class.
        count = min(n_samples, data.test_x.shape[0])
        index = torch.arange(count, device=data.test_x.device) * (data.test_x.shape[0] // count)
        sample_images = data.test_x[index]
        logits = model(data.normalize(sample_images))
        model.train()
    with atomic_path(run_dir / SAMPLES_FILE) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            images=sample_images.cpu().numpy(),  # uint8 (N, C, H, W), as read from the dataset
            labels=data.test_y[index].cpu().numpy(),
            predictions=logits.argmax(1).cpu().numpy(),
            classes=np.array(data.classes),
        )


def write_per_class(path: Path, confusion: torch.Tensor, classes: list[str]) -> None:
    totals = confusion.sum(1)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "correct", "total", "accuracy"])
        for i, name in enumerate(classes):
            total = int(totals[i])
            correct = int(confusion[i, i])
            writer.writerow([name, correct, total, correct / total if total else float("nan")])


def write_confusion(path: Path, confusion: torch.Tensor, classes: list[str]) -> None:
    """Rows are true classes, columns predicted classes."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *classes])
        for i, name in enumerate(classes):
            writer.writerow([name, *(int(c) for c in confusion[i])])
