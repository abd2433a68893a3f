"""Synthetic data: CIFAR-shaped images whose class is learnable, offline and deterministic."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from cnnexp.data.splits import ImageSplits


def synthetic_splits(cfg: DictConfig) -> ImageSplits:
    """CIFAR-shaped images whose class is learnable: each class has a smooth
    random colour pattern; every image is that pattern, shifted by a few
    pixels, plus pixel noise. Deterministic from data.seed."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    size, k = int(cfg.image_size), int(cfg.num_classes)
    coarse = torch.rand(k, 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % k  # balanced classes
        labels = labels[torch.randperm(n, generator=g)]
        images = patterns[labels]
        shifts = torch.randint(-3, 4, (n, 2), generator=g)
        for dx in range(-3, 4):  # roll per shift value: cheap and vectorised
            for axis, col in ((3, 0), (2, 1)):
                sel = shifts[:, col] == dx
                if sel.any():
                    images[sel] = torch.roll(images[sel], dx, dims=axis)
        images = images + float(cfg.noise) * torch.randn(images.shape, generator=g)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    train_images, train_labels = make(int(cfg.n_train))
    test_images, test_labels = make(int(cfg.n_test))
    classes = [f"class_{i}" for i in range(k)]
    return ImageSplits(train_images, train_labels, test_images, test_labels, classes)
