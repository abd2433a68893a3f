"""Datasets as tensors in memory: decoded once, put on the device once.

Every dataset ends as uint8 images (N, C, H, W) and int64 labels, moved to
the training device as they are. The training loop takes batches as index
slices of these tensors (no DataLoader, no PIL) and normalises each batch
inside the step: three small tensor operations, which keep CIFAR-10 at
180 MB in memory where float32 copies would take 740 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from cnnexp.errors import ConfigError


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


class Normalizer:
    """uint8 images -> float32 (x/255 - mean) / std, per channel, computed as
    (x - 255*mean) / (255*std): three operations per batch, and for the
    default mean = std = 0.5 the subtraction is exact, so one rounding in all."""

    def __init__(self, mean, std, channels: int, device):
        if len(mean) != channels or len(std) != channels:
            # A grayscale dataset with the default 3-channel stats: use the first value.
            mean, std = [mean[0]] * channels, [std[0]] * channels
        self.shift = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = torch.tensor([255.0 * s for s in std], dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().sub_(self.shift).div_(self.scale)


@dataclass
class DeviceData:
    """uint8 images and labels on the training device, with their normaliser."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    normalize: Normalizer
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_splits(cfg: DictConfig) -> ImageSplits:
    """Read the configured dataset into uint8 tensors (downloading if needed)."""
    name = cfg.name
    if name == "synthetic":
        return synthetic_splits(cfg)
    if name == "cifar10":
        from cnnexp.cifar10 import read_cifar10

        return read_cifar10(cfg)
    if name == "imagefolder":
        from cnnexp.imagefolder import read_imagefolder

        return read_imagefolder(cfg)
    raise ConfigError(f"data.name={name!r} is not a known dataset; use cifar10, synthetic or imagefolder.")


def to_device(splits: ImageSplits, cfg: DictConfig, device: torch.device) -> DeviceData:
    has_val = splits.val_images is not None
    return DeviceData(
        train_x=splits.train_images.to(device),
        train_y=splits.train_labels.to(device),
        test_x=splits.test_images.to(device),
        test_y=splits.test_labels.to(device),
        classes=list(splits.classes),
        normalize=Normalizer(cfg.mean, cfg.std, splits.in_channels, device),
        val_x=splits.val_images.to(device) if has_val else None,
        val_y=splits.val_labels.to(device) if has_val else None,
    )


# ---------------------------------------------------------------- validation split
def check_val_size(val_size: float, n_train: int | None = None) -> None:
    """Range checks of data.val_size that need no data (n_train when it is known up front)."""
    allowed = "a count of training images (e.g. 5000) or a fraction in (0, 1) (e.g. 0.1); 0 for no split"
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        raise ConfigError(f"data.val_size={val_size:g} is not allowed: {allowed}.")
    if n_train is not None and val_size >= 1 and val_size >= n_train:
        raise ConfigError(f"data.val_size={val_size:g} is not allowed: the training split has only {n_train} "
                          f"images and at least one must remain for training; hold out fewer, or a fraction.")


def val_count(val_size: float, n_train: int) -> int:
    """How many of n_train images data.val_size holds out."""
    return int(val_size) if val_size >= 1 else round(val_size * n_train)


def split_validation(splits: ImageSplits, val_size: float, split_seed: int) -> ImageSplits:
    """Hold out val_size training images, stratified per class.

    Each class gives its share of the holdout (largest remainders make the
    shares add up to the exact count), drawn by a generator seeded from
    split_seed alone: every job of a trainer.seed sweep trains on the same
    images. Both parts keep the training images' original order."""
    if not val_size:
        return splits
    labels, n = splits.train_labels, splits.train_labels.numel()
    check_val_size(val_size, n)
    total = val_count(val_size, n)
    if total < 1:
        raise ConfigError(f"data.val_size={val_size:g} of {n} training images holds out no image; "
                          "use a larger fraction or a count.")
    counts = torch.bincount(labels, minlength=len(splits.classes))
    exact = counts.double() * total / n
    shares = exact.floor().long()
    # Largest remainders first; ties go to the lower class index (stable sort).
    order = torch.sort(exact - shares, descending=True, stable=True).indices
    shares[order[: total - int(shares.sum())]] += 1
    emptied = [splits.classes[c] for c in range(len(counts)) if counts[c] and shares[c] >= counts[c]]
    if emptied:
        raise ConfigError(
            f"data.val_size={val_size:g} leaves class {emptied[0]!r} with no training image "
            f"({int(counts[splits.classes.index(emptied[0])])} in all); hold out fewer images."
        )
    g = torch.Generator().manual_seed(int(split_seed))
    held = torch.zeros(n, dtype=torch.bool)
    for c in range(len(counts)):
        members = torch.nonzero(labels == c).flatten()
        held[members[torch.randperm(members.numel(), generator=g)[: int(shares[c])]]] = True
    return ImageSplits(
        train_images=splits.train_images[~held],
        train_labels=labels[~held],
        test_images=splits.test_images,
        test_labels=splits.test_labels,
        classes=splits.classes,
        val_images=splits.train_images[held],
        val_labels=labels[held],
    )


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
