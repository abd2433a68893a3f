"""Checks that run before any work: no download, no training, no files.

Types and unknown keys are already checked by the schema (cnnexp/schema.py)
while Hydra composes; these are the ranges and facts a type cannot express.
Each failure is one ConfigError naming the key, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp.errors import ConfigError
from cnnexp.targets import check_all_targets

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}.")


# What a mandatory key (??? in the config) holds, for the message when it is not set.
MANDATORY_HINTS = {"data.root": "a folder holding train/<class>/ and test/<class>/"}


def validate_config(cfg: DictConfig) -> None:
    check_mandatory(cfg)
    optim, data, trainer = cfg.optim, cfg.data, cfg.trainer
    _require(optim.lr > 0, "optim.lr", optim.lr, "the learning rate must be > 0")
    if "momentum" in optim:
        _require(0 <= optim.momentum < 1, "optim.momentum", optim.momentum, "momentum must be in [0, 1)")
    if "weight_decay" in optim:
        _require(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "weight decay must be >= 0")
    if "betas" in optim:
        _require(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas",
                 list(optim.betas), "two values in [0, 1)")
    _require(data.batch_size >= 1, "data.batch_size", data.batch_size, "the batch size must be >= 1")
    _require(all(s > 0 for s in data.std), "data.std", list(data.std), "every std must be > 0")
    if not (len(data.mean) == len(data.std) and len(data.mean) in (1, 3)):
        raise ConfigError(f"data.mean={list(data.mean)} and data.std={list(data.std)} do not fit: give one value, "
                          "or one per colour channel (3), in both.")
    _require(trainer.max_epochs >= 1, "trainer.max_epochs", trainer.max_epochs, "train at least 1 epoch")
    _require(trainer.eval_batch_size >= 1, "trainer.eval_batch_size", trainer.eval_batch_size, "must be >= 1")
    _require(trainer.num_threads is None or trainer.num_threads >= 1, "trainer.num_threads", trainer.num_threads,
             "null (automatic) or >= 1")
    _require(trainer.get("cpu_step", "auto") in ("auto", "eager", "compiled"), "trainer.cpu_step",
             trainer.get("cpu_step"), "use auto, eager or compiled")
    _require(trainer.lr_schedule in ("constant", "cosine"), "trainer.lr_schedule", trainer.lr_schedule,
             "use constant or cosine")
    _require(trainer.progress in ("auto", "bar", "log", "none"), "trainer.progress", trainer.progress,
             "use auto, bar, log or none")
    _require(trainer.log_every_steps >= 1, "trainer.log_every_steps", trainer.log_every_steps, "must be >= 1")
    _require(0 <= trainer.seed < 2**32, "trainer.seed", trainer.seed, "a seed in [0, 2**32)")
    check_device(trainer.device)
    validate_model(cfg.model)
    check_all_targets(cfg)
    if data.name == "synthetic":
        _require(data.n_train >= 1, "data.n_train", data.n_train, "at least 1 training image")
        _require(data.n_test >= 1, "data.n_test", data.n_test, "at least 1 test image")
        _require(data.num_classes >= 2, "data.num_classes", data.num_classes, "at least 2 classes")
        _require(data.image_size >= 8, "data.image_size", data.image_size, "at least 8 pixels")
        _require(0 <= data.seed < 2**32, "data.seed", data.seed, "a seed in [0, 2**32)")
        _require(data.noise >= 0, "data.noise", data.noise, "a noise level >= 0")
    if data.name == "imagefolder":
        from cnnexp.imagefolder import check_layout

        check_layout(str(data.root))
        _require(data.resize is None or data.resize >= 1, "data.resize", data.resize, "null or a size >= 1")
    check_split_and_objective(cfg)


def check_mandatory(cfg: DictConfig) -> None:
    """Keys a group option leaves for the user to set (data=imagefolder's data.root)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        hint = f" ({MANDATORY_HINTS[key]})" if key in MANDATORY_HINTS else ""
        raise ConfigError(f"{key} must be set: add {key}=...{hint} to the command.")


def validate_model(model: DictConfig) -> None:
    """Ranges of the keys cnnexp's models take; any model with such a key gets the same check."""
    if "width" in model:
        _require(model.width >= 1, "model.width", model.width, "the first block needs at least 1 channel")
    if "dropout" in model:
        _require(0 <= model.dropout < 1, "model.dropout", model.dropout, "a probability in [0, 1)")


def check_split_and_objective(cfg: DictConfig) -> None:
    from cnnexp.data import check_val_size
    from cnnexp.objective import from_config

    known_train_size = {"synthetic": cfg.data.get("n_train"), "cifar10": 50000}.get(cfg.data.name)
    check_val_size(cfg.data.val_size, known_train_size)
    if not cfg.trainer.resume:  # a resumed run is checked against its own split (cnnexp/run.py)
        from_config(cfg)


def check_device(device: str) -> None:
    _require(bool(DEVICE_PATTERN.match(device)), "trainer.device", device, "use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={device!r} but no CUDA GPU is available here; use trainer.device=cpu (or auto)."
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        _require(index < torch.cuda.device_count(), "trainer.device", device,
                 f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("trainer.device='mps' but MPS is not available here; use trainer.device=cpu (or auto).")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"The output directory {run_dir} cannot be written ({err.strerror or err}); "
            "choose another with hydra.run.dir=PATH (or hydra.sweep.dir=PATH for -m)."
        ) from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"The output directory {run_dir} is not writable; choose another with hydra.run.dir=PATH.")
