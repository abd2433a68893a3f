"""Datasets as tensors in memory: decoded once, put on the device once.

    splits.py       ImageSplits, what every reader returns (uint8 images, labels, classes)
    synthetic.py    generated images (offline, deterministic)
    cifar10.py      the official CIFAR-10 archive (download, md5 check, decode)
    imagefolder.py  train/<class>/* and test/<class>/* folders of image files
    validation.py   the stratified validation split (data.val_size)
    subset.py       stratified subsets of any dataset (data.n_train, data.n_test)
    augment.py      training-image augmentation on the device; test-time views
    device.py       the splits on the training device, with their normaliser

`read_splits(cfg.data)` picks the reader by data.name: to add a dataset,
write a reader returning ImageSplits and add it to READERS (and a schema
node and a conf/data/ option).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp.data.cifar10 import read_cifar10
from cnnexp.data.device import DeviceData, Normalizer, to_device
from cnnexp.data.imagefolder import read_imagefolder
from cnnexp.data.splits import ImageSplits
from cnnexp.data.subset import take_subsets
from cnnexp.data.synthetic import synthetic_splits
from cnnexp.data.validation import check_val_size, split_validation, val_count
from cnnexp.errors import ConfigError

__all__ = ["READERS", "DeviceData", "ImageSplits", "Normalizer", "check_val_size", "read_splits",
           "split_validation", "synthetic_splits", "to_device", "val_count"]

READERS: dict[str, Callable[[DictConfig], ImageSplits]] = {
    "cifar10": read_cifar10,
    "synthetic": synthetic_splits,
    "imagefolder": read_imagefolder,
}


def read_splits(cfg: DictConfig) -> ImageSplits:
    """Read the configured dataset into uint8 tensors (downloading if needed).

    The next job of a sweep in the same process (basic launcher, a joblib
    worker) with the same data.* gets the same tensors without decoding again:
    a run never changes its images in place (batches, augmentations and the
    validation split are new tensors), and tensors changed anyway are read afresh."""
    key = _memo_key(cfg)
    if _memo and _memo[0] == key and all(t._version == v for t, v in _memo[2]):
        return dataclasses.replace(_memo[1])
    reader = READERS.get(cfg.name)
    if reader is None:
        raise ConfigError(f"data.name={cfg.name!r} is not a known dataset; use {', '.join(READERS)}.")
    splits = reader(cfg)
    if cfg.name != "synthetic":  # synthetic data is generated at n_train / n_test already
        splits = take_subsets(splits, cfg.get("n_train"), cfg.get("n_test"), int(cfg.get("split_seed", 0)))
    tensors = [t for t in vars(splits).values() if isinstance(t, torch.Tensor)]
    _memo[:] = [key, dataclasses.replace(splits), [(t, t._version) for t in tensors]]  # the last dataset only
    return splits


_memo: list = []  # [key, splits, (tensor, its version counter) ...] of the last dataset read
_READ_LATER = ("batch_size", "mean", "std", "val_size")  # keys only the later stages read


def _memo_key(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    return json.dumps({k: v for k, v in data.items() if k not in _READ_LATER}, sort_keys=True, default=str)
