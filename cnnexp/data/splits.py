"""ImageSplits: what every dataset reader returns.

Every dataset ends as uint8 images (N, C, H, W) and int64 labels, with the
class names; the training device, normalisation and batching come later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSplits:
    """Raw uint8 images and labels of both splits, plus the class names."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    val_images: torch.Tensor | None = None  # held out of the training images (data.val_size)
    val_labels: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[2:])
