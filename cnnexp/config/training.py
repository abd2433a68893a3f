"""Checks of the training options past the original experiment, before any work:
the timm model name, the precision on this device, what early stopping
watches, and subset and batch sizes that are known before the data is read.
Each failure is one ConfigError naming the key and what to use instead.
"""

from __future__ import annotations

from omegaconf import DictConfig

from cnnexp.data.subset import check_subset_size
from cnnexp.data.validation import val_count
from cnnexp.engine.precision import precision_problem
from cnnexp.errors import ConfigError
from cnnexp.models import check_timm_name

# Training and test images of the datasets whose size is known without reading them.
KNOWN_SIZES = {"cifar10": (50000, 10000, 10)}


def check_training_options(cfg: DictConfig, device_type: str) -> None:
    if str(cfg.model.get("_target_", "")).endswith("models.TimmModel"):
        check_timm_name(str(cfg.model.name))
    t_cfg = cfg.trainer
    problem = precision_problem(str(t_cfg.get("precision", "32")), device_type)
    if problem:
        raise ConfigError(problem)
    check_early_stopping(t_cfg, cfg.data)
    check_sizes(cfg.data)
    augment = cfg.get("augment") or {}
    if augment.get("alternate_flip", False) and not augment.get("flip", False):
        raise ConfigError("augment.alternate_flip=true changes how images are flipped, but augment.flip is false: "
                          "add augment.flip=true (or use augment=flip_crop).")


def check_early_stopping(t_cfg: DictConfig, data_cfg: DictConfig) -> None:
    es = t_cfg.get("early_stopping")
    if es is None:
        return
    if es.patience < 0 or es.min_delta < 0:
        raise ConfigError(f"trainer.early_stopping.patience={es.patience} / min_delta={es.min_delta}: both must "
                          "be >= 0 (patience 0 switches early stopping off).")
    monitors = ("auto", "val_acc", "val_loss", "test_acc", "test_loss")
    if es.monitor not in monitors:
        raise ConfigError(f"trainer.early_stopping.monitor={es.monitor!r} is not allowed: use {', '.join(monitors)}.")
    if es.patience and str(es.monitor).startswith("val") and not data_cfg.get("val_size", 0):
        raise ConfigError(f"trainer.early_stopping.monitor={es.monitor} has nothing to monitor: the run holds no "
                          "validation split; add data.val_size=0.1 (or monitor=auto, which watches test_acc "
                          "with a warning).")


def check_sizes(data_cfg: DictConfig) -> None:
    """Subset and batch sizes against the dataset, where its size is known before reading it."""
    name = data_cfg.name
    if name == "synthetic":
        n_train, classes = int(data_cfg.n_train), int(data_cfg.num_classes)
        check_subset_size("data.n_train", n_train, n_train, classes)
        check_subset_size("data.n_test", int(data_cfg.n_test), int(data_cfg.n_test), classes)
    elif name in KNOWN_SIZES:
        total_train, total_test, classes = KNOWN_SIZES[name]
        check_subset_size("data.n_train", data_cfg.get("n_train"), total_train, classes)
        check_subset_size("data.n_test", data_cfg.get("n_test"), total_test, classes)
        n_train = data_cfg.get("n_train") or total_train
    else:
        return  # an image folder is counted when it is listed (data/imagefolder.py)
    val_size = float(data_cfg.get("val_size", 0) or 0)
    remaining = n_train - (val_count(val_size, n_train) if val_size and (val_size < 1 or val_size < n_train) else 0)
    if data_cfg.batch_size > remaining:
        raise ConfigError(f"data.batch_size={data_cfg.batch_size} is larger than the training set ({remaining} "
                          f"images); use data.batch_size={remaining} or less, or more training images.")
