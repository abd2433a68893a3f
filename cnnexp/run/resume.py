"""Resume: what a checkpoint holds and how a run goes on from it.

Everything that decides how a run continues lives here: the checkpoint's
contents (model, optimiser, every random state, the metrics rows, the
interrupted epoch's logits, the selected epoch's weights, the CPU step plan
and the config), where a run starts (fresh, from a checkpoint, or already
done), which config keys the command line may change on a resume (the
schema marks them), and how run.json and cnnexp.log continue.

checkpoints/last.pt is written atomically (temp file, fsync, rename): a kill
or a full disk during the write leaves the previous checkpoint intact. It
holds tensors and plain values only (random states included), so it is read
with torch's weights-only unpickler: a shared run directory whose checkpoint
would run code when unpickled is refused (safeio.load_tensors).

Who may write into a run directory (one process at a time; a new run never
where another's results are) is run/ownership.py.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp.config.schema import resumable_keys
from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.results.files import CHECKPOINT_NAME, LOG_FILE
from cnnexp.results.record import RunRecord, read_record
from cnnexp.run.ownership import SweepDirTaken, job_dir_conflict, refuse_if_taken
from cnnexp.safeio import LogFileHandler, atomic_torch_save, load_tensors

log = logging.getLogger("cnnexp")
# 2: random states as tensors and plain values (1 held numpy's state tuple, which
# still loads: numpy arrays are allow-listed in safeio.load_tensors).
CHECKPOINT_FORMAT = 2
PLAIN_TYPES = (int, float, str, bool, type(None))


# ---------------------------------------------------------------- the checkpoint
@dataclass
class Checkpoint:
    """The contents of checkpoints/last.pt."""

    epoch: int  # completed epochs
    step: int  # steps done in the next epoch; non-zero only for a stop inside an epoch
    model: dict
    optimizer: dict
    rng: dict  # torch, numpy, python, data_order (and cuda) generator states
    metrics: list[dict]  # the metrics.csv rows of the completed epochs
    config: dict  # the run's resolved config: a resume trains on with it
    partial: dict | None = None  # the interrupted epoch's recorded logits and seconds
    best_model: dict | None = None  # the selected epoch's weights, to restore model_best.pt
    step_plan: dict | None = None  # the CPU step, so a resumed run steps alike
    ema: dict | None = None  # the weight average (trainer.ema_decay)
    lookahead: dict | None = None  # the slow weights and the step count (trainer.lookahead_every)
    format: int = CHECKPOINT_FORMAT

    def save(self, run_dir: Path) -> None:
        state = asdict(self)
        _check_plain(state, "Checkpoint")  # what weights-only loading can read back
        atomic_torch_save(state, Path(run_dir) / CHECKPOINT_NAME)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            state = load_tensors(path)  # never runs code a shared checkpoint may carry
        except CnnexpError as err:
            raise ConfigError(f"trainer.resume: {err}") from None
        except Exception as err:
            raise ConfigError(f"trainer.resume: {path} cannot be read ({err}); it may be truncated.") from None
        if not isinstance(state, dict) or "model" not in state:
            raise ConfigError(f"trainer.resume: {path} is not a cnnexp checkpoint (no model state in it).")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in state.items() if k in known})


def _check_plain(value, where: str) -> None:
    """A checkpoint holds tensors, plain values and containers of them only."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, (torch.Tensor, *PLAIN_TYPES)):
        raise TypeError(f"{where} is a {type(value).__name__}; a checkpoint holds tensors and plain values only "
                        "(convert it on save and back on restore, as the random states are)")


def rng_states(data_generator: torch.Generator) -> dict:
    """Every random state, as tensors and plain values."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_plain(np.random.get_state()),
        "python": random.getstate(),  # (version, tuple of ints, None or a float)
        "data_order": data_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _numpy_state_plain(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_tuple(state) -> tuple:
    if not isinstance(state, dict):  # a format-1 checkpoint: numpy's own tuple
        return tuple(state)
    keys = state["keys"].numpy().astype(np.uint32)
    return state["bit_generator"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def restore_rng_states(states: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(_numpy_state_tuple(states["numpy"]))
    python = states["python"]  # tuples may come back as lists
    random.setstate((python[0], tuple(python[1]), python[2]))
    data_generator.set_state(states["data_order"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class ResumePoint:
    """Where the training loop picks up: the first epoch and step to run."""

    epoch: int = 1
    step: int = 0
    rows: list[dict] = field(default_factory=list)
    partial: dict | None = None
    best_model: dict | None = None


def restore(checkpoint: Checkpoint | None, model, optimizer, data_order: torch.Generator) -> ResumePoint:
    """Put the model, optimiser and random states back as the checkpoint left them."""
    if checkpoint is None:
        return ResumePoint()
    model.load_state_dict(checkpoint.model)
    optimizer.load_state_dict(checkpoint.optimizer)
    restore_rng_states(checkpoint.rng, data_order)
    log.info("Resuming at epoch %d, step %d", checkpoint.epoch + 1, checkpoint.step)
    return ResumePoint(epoch=checkpoint.epoch + 1, step=checkpoint.step, rows=list(checkpoint.metrics),
                       partial=checkpoint.partial, best_model=checkpoint.best_model)


# ---------------------------------------------------------------- where a run starts
def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


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


@dataclass
class Start:
    """How a job starts: fresh (checkpoint None), from a checkpoint, or not at all (done)."""

    run_dir: Path
    checkpoint: Checkpoint | None = None
    done: bool = False


def plan_start(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]) -> Start:
    """trainer.resume names the run to continue; a sweep job whose directory
    holds a run picks up from it (or skips it when it completed); a plain run
    starts only in a directory without another run's results."""
    if cfg.trainer.resume:
        path = find_checkpoint(str(cfg.trainer.resume))
        return Start(run_dir=path.parent.parent, checkpoint=Checkpoint.load(path))
    if not multirun:
        refuse_if_taken(run_dir)
        return Start(run_dir)
    record = read_record(run_dir)
    if record is None:
        return Start(run_dir)
    conflict = job_dir_conflict(run_dir, overrides)
    if conflict:
        raise SweepDirTaken(conflict)
    if record.get("status") == "completed":
        return Start(run_dir, done=True)
    if cfg.trainer.checkpoint and checkpoint_path(run_dir).is_file():  # never continue from a stale one
        log.info("Continuing %s from its last checkpoint", run_dir)
        return Start(run_dir, checkpoint=Checkpoint.load(checkpoint_path(run_dir)))
    return Start(run_dir)


def config_for_resume(saved: dict, current: DictConfig, explicit_overrides: list[str]) -> DictConfig:
    """The saved run's config; the command line may change only how it runs on
    (the keys the schema marks resumable: epochs, device, threads, ...)."""
    resumed = OmegaConf.create(saved)
    resumed.trainer.resume = current.trainer.resume
    changeable = resumable_keys()
    for override in explicit_overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key.startswith("hydra") or key == "trainer.resume":
            continue
        if key.split(".")[0].split("/")[0] == "logger":  # trackers watch a run; they do not change it
            resumed.logger = current.logger
            continue
        if key in changeable:
            OmegaConf.update(resumed, key, OmegaConf.select(current, key), merge=False)
        elif "/" in key or OmegaConf.select(resumed, key, default=None) != OmegaConf.select(current, key, default=None):
            raise ConfigError(
                f"{override!r} differs from the run being resumed; trainer.resume continues a run with its own "
                f"config (only {', '.join(changeable)} may change). Start a new run instead."
            )
    return resumed


# ---------------------------------------------------------------- the run's own files go on
def continued_record(run_dir: Path, overrides: list[str], from_epoch: int, command: str | None = None,
                     **fields) -> RunRecord:
    """The run.json of a run that goes on from its checkpoint: what the run was
    (first start, overrides, command, results so far) stays; how this segment
    runs is new, and `resumes` gains an entry."""
    previous = read_record(run_dir) or {}
    record = RunRecord(run_dir, overrides=overrides, command=command, **fields)
    if not previous:
        return record
    resume = {"at": record.data["started_at"], "overrides": overrides, "command": command,
              "from_epoch": from_epoch}
    ended = {"error": None} if "error" in previous else {}
    kept = {k: previous[k] for k in ("started_at", "overrides", "command") if previous.get(k) is not None}
    record.data = {**previous, **record.data, **ended, **kept,
                   "resumes": [*previous.get("resumes", []), resume]}
    record.earlier_seconds = float(previous.get("wall_seconds") or 0.0)
    return record


def continue_log(run_dir: Path) -> None:
    """Continue the resumed run's own cnnexp.log (Hydra logs into this invocation's dir)."""
    path = Path(run_dir) / LOG_FILE
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        return
    handler = LogFileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
