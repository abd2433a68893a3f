"""checkpoints/last.pt: everything needed to continue a run exactly.

Written atomically (temp file, fsync, rename): a kill or a full disk during
the write leaves the previous checkpoint intact and no temp file behind."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cnnexp.errors import ConfigError
from cnnexp.safeio import atomic_path

CHECKPOINT_NAME = "checkpoints/last.pt"


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path, durable=True) as tmp:
        # Through a Python file, so a full disk surfaces as an OSError (ENOSPC).
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def rng_states(data_generator: torch.Generator) -> dict:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data_order": data_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    data_generator.set_state(states["data_order"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def find_checkpoint(resume: str) -> Path:
    """trainer.resume may name a run dir or the checkpoint file itself."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(
            f"trainer.resume={resume!r}: no checkpoint found at {path}. "
            "Give a run directory that holds checkpoints/last.pt, or the .pt file itself."
        )
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        # The checkpoint holds RNG states and plain Python objects; it is cnnexp's own file.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(f"trainer.resume: {path} cannot be read ({err}); it may be truncated.") from None
