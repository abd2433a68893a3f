"""Checks that run before any work: no download, no training, no files.

Types and unknown keys are already checked by the schema (config/schema.py)
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

from cnnexp.config.schema import field_checks
from cnnexp.config.targets import check_all_targets
from cnnexp.data import check_val_size
from cnnexp.data.imagefolder import check_layout
from cnnexp.errors import ConfigError
from cnnexp.results.objective import from_config

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}.")


# What a mandatory key (??? in the config) holds, for the message when it is not set.
MANDATORY_HINTS = {"data.root": "a folder holding train/<class>/ and test/<class>/"}


def validate_config(cfg: DictConfig) -> None:
    check_mandatory(cfg)
    data = cfg.data
    for group in ("optim", "data", "trainer"):
        check_keys(cfg[group], group)
    if not (len(data.mean) == len(data.std) and len(data.mean) in (1, 3)):
        raise ConfigError(f"data.mean={list(data.mean)} and data.std={list(data.std)} do not fit: give one value, "
                          "or one per colour channel (3), in both.")
    check_device(cfg.trainer.device)
    validate_model(cfg.model)
    check_all_targets(cfg)
    if data.name == "imagefolder":
        check_layout(str(data.root))
    check_split_and_objective(cfg)


def check_keys(node: DictConfig, group: str) -> None:
    """The range check of each key the schema gives one (config/schema.py)."""
    for name, (check, allowed) in field_checks(group).items():
        if name in node:
            value = node[name]
            plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            _require(check(plain), f"{group}.{name}", plain, allowed)


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
    known_train_size = {"synthetic": cfg.data.get("n_train"), "cifar10": 50000}.get(cfg.data.name)
    check_val_size(cfg.data.val_size, known_train_size)
    if not cfg.trainer.resume:  # a resumed run is checked against its own split (run/job.py)
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
