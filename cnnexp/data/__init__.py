"""Datasets as tensors in memory: decoded once, put on the device once.

    splits.py       ImageSplits, what every reader returns (uint8 images, labels, classes)
    synthetic.py    generated images (offline, deterministic)
    cifar10.py      the official CIFAR-10 archive (download, md5 check, decode)
    imagefolder.py  train/<class>/* and test/<class>/* folders of image files
    validation.py   the stratified validation split (data.val_size)
    device.py       the splits on the training device, with their normaliser

`read_splits(cfg.data)` picks the reader by data.name: to add a dataset,
write a reader returning ImageSplits and add it to READERS (and a schema
node and a conf/data/ option).
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from cnnexp.data.cifar10 import read_cifar10
from cnnexp.data.device import DeviceData, Normalizer, to_device
from cnnexp.data.imagefolder import read_imagefolder
from cnnexp.data.splits import ImageSplits
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
    """Read the configured dataset into uint8 tensors (downloading if needed)."""
    reader = READERS.get(cfg.name)
    if reader is None:
        raise ConfigError(f"data.name={cfg.name!r} is not a known dataset; use {', '.join(READERS)}.")
    return reader(cfg)
