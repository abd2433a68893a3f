"""Stratified, seeded subsets of a dataset (data.n_train, data.n_test).

Each class keeps its share of the requested count (largest remainders make
the shares add up exactly), drawn by a generator seeded from data.split_seed
alone, so every job of a trainer.seed sweep sees the same images; the kept
images stay in their original order.
"""

from __future__ import annotations

import torch

from cnnexp.data.splits import ImageSplits
from cnnexp.errors import ConfigError


def check_subset_size(key: str, wanted: int | None, available: int, num_classes: int) -> None:
    """data.n_train / data.n_test against what the dataset holds (a ConfigError naming the key)."""
    if wanted is None:
        return
    if wanted > available:
        raise ConfigError(f"{key}={wanted} is larger than the dataset's {available} images; use at most "
                          f"{available}, or null for all of them.")
    if wanted < num_classes:
        raise ConfigError(f"{key}={wanted} is below the {num_classes} classes: a stratified subset needs at "
                          f"least one image per class; use {key}={num_classes} or more.")


def stratified_indices(labels: torch.Tensor, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """Sorted indices of `count` items, each class keeping its share of `count`."""
    n = labels.numel()
    per_class = torch.bincount(labels, minlength=num_classes)
    exact = per_class.double() * count / n
    shares = exact.floor().long()
    order = torch.sort(exact - shares, descending=True, stable=True).indices  # ties: lower class first
    shares[order[: count - int(shares.sum())]] += 1
    g = torch.Generator().manual_seed(int(seed))
    keep = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        keep.append(members[torch.randperm(members.numel(), generator=g)[: int(shares[c])]])
    return torch.sort(torch.cat(keep)).values


def take_subsets(splits: ImageSplits, n_train: int | None, n_test: int | None, seed: int) -> ImageSplits:
    """The splits cut to n_train training and n_test test images (None: all)."""
    k = len(splits.classes)
    check_subset_size("data.n_train", n_train, splits.train_labels.numel(), k)
    check_subset_size("data.n_test", n_test, splits.test_labels.numel(), k)
    train_x, train_y, test_x, test_y = splits.train_images, splits.train_labels, splits.test_images, splits.test_labels
    if n_train is not None and n_train < train_y.numel():
        keep = stratified_indices(train_y, n_train, k, seed)
        train_x, train_y = train_x[keep], train_y[keep]
    if n_test is not None and n_test < test_y.numel():
        keep = stratified_indices(test_y, n_test, k, seed + 1)  # a draw of its own
        test_x, test_y = test_x[keep], test_y[keep]
    return ImageSplits(train_x, train_y, test_x, test_y, splits.classes)
