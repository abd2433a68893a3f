"""The validation split: training images held out, stratified per class (data.val_size)."""

from __future__ import annotations

import torch

from cnnexp.data.splits import ImageSplits
from cnnexp.errors import ConfigError


def check_val_size(val_size: float, n_train: int | None = None) -> None:
    """Range checks of data.val_size that need no data (n_train when it is known up front)."""
    allowed = "a count of training images (e.g. 5000) or a fraction in (0, 1) (e.g. 0.1); 0 for no split"
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        raise ConfigError(f"data.val_size={val_size:g} is not allowed: {allowed}.")
    if val_size == 1:  # 1 and 1.0 read the same: all of the images, or one of them?
        raise ConfigError("data.val_size=1 is ambiguous (a fraction means below 1; a count of one image is no "
                          "validation split): give a fraction such as 0.1, or a count of 2 or more images.")
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
