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

    # Every image is one of k patterns rolled by one of 7 x 7 shifts: build those
    # k * 49 images once and gather, instead of rolling the images themselves.
    offsets = range(-3, 4)
    shifted = torch.stack([torch.roll(patterns, (dy, dx), dims=(2, 3)) for dy in offsets for dx in offsets], dim=1)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % k  # balanced classes
        labels = labels[torch.randperm(n, generator=g)]
        shifts = torch.randint(-3, 4, (n, 2), generator=g)  # (dx, dy) per image
        images = shifted[labels, (shifts[:, 1] + 3) * 7 + (shifts[:, 0] + 3)]
        noisy = torch.randn(images.shape, generator=g).mul_(float(cfg.noise)).add_(images)
        return noisy.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels

    train_images, train_labels = make(int(cfg.n_train))
    test_images, test_labels = make(int(cfg.n_test))
    classes = [f"class_{i}" for i in range(k)]
    return ImageSplits(train_images, train_labels, test_images, test_labels, classes)
