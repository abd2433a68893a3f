"""A trained run, loaded: its model rebuilt from the saved config with the chosen
weights, its classes, and the preprocessing it was trained with.

    import cnnexp
    run = cnnexp.load_run("outputs/2026-11-28/16-05-12")     # weights="best" | "final" | a file
    run.predict([Image.open("cat.jpg")]).names               # ['cat']
    batch = run.preprocess(images)                           # what run.model takes

Where the pieces come from: the config from .hydra/config.yaml (the
checkpoint's copy when that is gone); the classes and input shape from
run.json (runs written before it recorded them: per_class.csv, the sample
file, or the dataset's own names); the weights as `choose_weights` says.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from cnnexp.config.checks import check_device, resolve_device
from cnnexp.config.schema import SCHEMAS
from cnnexp.config.targets import locate
from cnnexp.cpu import cpu_settings
from cnnexp.data.imagefolder import class_folders
from cnnexp.engine.evaluate import epoch_tta, eval_logits
from cnnexp.engine.precision import StepOptions
from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.results.files import (
    BEST_MODEL_FILE,
    CHECKPOINT_NAME,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PER_CLASS_FILE,
    RUN_RECORD,
    SAMPLES_FILE,
)
from cnnexp.results.metrics import read_metrics
from cnnexp.results.objective import selected_row
from cnnexp.results.record import read_record
from cnnexp.run.build import instantiate_model, plan_threads, step_options
from cnnexp.safeio import load_tensors
from cnnexp.sweep.table import is_sweep_dir
from cnnexp.use.preprocess import Preprocessor
from cnnexp.version import __version__

BEST, FINAL = "best", "final"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------- the run directory
def check_run_dir(path) -> Path:
    """The run directory `path` names; ConfigError when it is none."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"{path} is not a directory; give the directory of a run (outputs/<date>/<time>).")
    if not (run_dir / CONFIG_FILE).is_file() and not (run_dir / CHECKPOINT_NAME).is_file():
        if is_sweep_dir(run_dir):
            raise ConfigError(f"{path} is a sweep directory; give one of its jobs ({run_dir / '0'}), or --best "
                              "for the job its ranking selected.")
        raise ConfigError(f"{path} is not a run directory: it has neither {CONFIG_FILE} nor {CHECKPOINT_NAME}.")
    return run_dir


def read_config(run_dir: Path) -> DictConfig:
    """The run's composed config: Hydra's copy, else the one its checkpoint carries."""
    if (run_dir / CONFIG_FILE).is_file():
        try:
            return OmegaConf.load(run_dir / CONFIG_FILE)
        except (OSError, yaml.YAMLError, ValueError) as err:
            raise ConfigError(f"{run_dir / CONFIG_FILE} cannot be read ({str(err).splitlines()[0]}).") from None
    state = _load(run_dir / CHECKPOINT_NAME)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ConfigError(f"{run_dir} has no {CONFIG_FILE} and its checkpoint holds no config: "
                          "the model cannot be rebuilt.")
    return OmegaConf.create(state["config"])


def check_compatible(run_dir: Path, cfg: DictConfig, record: dict) -> None:
    """Refuse a run this cnnexp cannot rebuild: written by a newer version, or
    with a config whose keys it does not know."""
    written_by = str((record.get("versions") or {}).get("cnnexp", ""))
    if _minor(written_by) > _minor(__version__) and "+source" not in __version__:
        raise ConfigError(f"{run_dir} was written by cnnexp {written_by}, newer than this cnnexp {__version__}; "
                          "upgrade cnnexp to use it.")
    by = f"cnnexp {written_by}" if written_by else "another cnnexp version"
    for key in ("model._target_", "data.name", "data.mean", "data.std"):
        if OmegaConf.select(cfg, key, default=None) is None:
            raise ConfigError(f"{run_dir} was written by {by}: its config has no {key}, so this cnnexp "
                              f"({__version__}) cannot rebuild the run.")
    schema = SCHEMAS["data"].get(str(cfg.data.name))
    if schema is None:
        raise ConfigError(f"{run_dir} was written by {by}: data.name={cfg.data.name!r} is not a dataset this "
                          f"cnnexp ({__version__}) knows.")
    try:
        OmegaConf.merge(OmegaConf.structured(schema), cfg.data)
    except Exception as err:  # an unknown key or a type this version reads differently
        raise ConfigError(f"{run_dir} was written by {by}, whose data config this cnnexp ({__version__}) cannot "
                          f"read: {str(err).splitlines()[0]}") from None


def _minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def has_val_split(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "data.val_size", default=0))


# ---------------------------------------------------------------- which weights
@dataclass
class Weights:
    """The weights a command uses, and what to tell the user about them."""

    choice: str  # "best", "final" or "file" (a file given by path)
    file: Path
    epoch: int | None  # the epoch they are from, where known
    note: str | None = None  # when they are not what was asked for

    def describe(self) -> str:
        at = f", epoch {self.epoch}" if self.epoch is not None else ""
        return f"{self.choice} weights ({self.file.name}{at})"


def choose_weights(run_dir: Path, weights: str, cfg: DictConfig, record: dict) -> Weights:
    """best: model_best.pt (the epoch selected by validation); a run without a
    validation split has no selected epoch, so best means its final weights,
    said in `note`. final: model.pt, or the last completed epoch of the
    checkpoint when the run did not finish. Anything else: a weights file."""
    if weights == BEST:
        if has_val_split(cfg) and (run_dir / BEST_MODEL_FILE).is_file():
            return Weights(BEST, run_dir / BEST_MODEL_FILE, record.get("best_epoch") or _best_epoch(run_dir))
        if not has_val_split(cfg):
            final = choose_weights(run_dir, FINAL, cfg, record)
            final.note = (f"the run has no validation split (data.val_size=0), so no selected epoch: "
                          f"using its final weights ({final.file.name}) for --weights best")
            return final
        return choose_weights(run_dir, FINAL, cfg, record)  # no epoch completed: final says so
    if weights == FINAL:
        if (run_dir / MODEL_FILE).is_file():
            return Weights(FINAL, run_dir / MODEL_FILE, _epochs_run(run_dir, record))
        if (run_dir / CHECKPOINT_NAME).is_file():
            epoch = _epochs_run(run_dir, record)
            return Weights(FINAL, run_dir / CHECKPOINT_NAME, epoch,
                           note=f"the run did not finish (run.json: {record.get('status', 'unknown')}): using the "
                                f"weights of its last completed epoch from {CHECKPOINT_NAME}")
        status = record.get("status", "unknown")
        why = f": {str(record['error']).splitlines()[0]}" if record.get("error") else ""
        raise ConfigError(f"{run_dir} has no weights ({MODEL_FILE}, {BEST_MODEL_FILE} or {CHECKPOINT_NAME}): "
                          f"the run ended ({status}{why}) before it completed an epoch.")
    path = Path(weights).expanduser()
    if not path.is_file() and (run_dir / weights).is_file():
        path = run_dir / weights
    if not path.is_file():
        raise ConfigError(f"--weights {weights!r} is neither best, final nor a weights file.")
    return Weights("file", path, None)


def _epochs_run(run_dir: Path, record: dict) -> int | None:
    metrics, _ = read_metrics(run_dir / METRICS_FILE)
    if metrics is not None and len(metrics):
        return int(metrics["epoch"].iloc[-1])
    return record.get("epochs_completed")


def _best_epoch(run_dir: Path) -> int | None:
    metrics, _ = read_metrics(run_dir / METRICS_FILE)
    best = selected_row(metrics.to_dict("records")) if metrics is not None else None
    return None if best is None else int(best["epoch"])


def _load(path: Path):
    try:
        return load_tensors(path)
    except CnnexpError:
        raise
    except Exception as err:
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          "it may be truncated.") from None


def read_state(weights: Weights) -> dict:
    """The model's state dict from a weights file or a checkpoint (its `model`)."""
    state = _load(weights.file)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "epoch" in state:
        if weights.epoch is None:
            weights.epoch = int(state["epoch"])
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{weights.file} holds no model weights (a state dict of tensors).")
    return state


# ---------------------------------------------------------------- classes and input shape
def read_classes(run_dir: Path, cfg: DictConfig, record: dict) -> list[str]:
    """The class names in the model's output order."""
    if record.get("classes"):
        return [str(c) for c in record["classes"]]
    if (run_dir / PER_CLASS_FILE).is_file():
        with open(run_dir / PER_CLASS_FILE, newline="") as f:
            names = [row["class"] for row in csv.DictReader(f)]
        if names:
            return names
    if (run_dir / SAMPLES_FILE).is_file():
        with np.load(run_dir / SAMPLES_FILE) as sample:
            return [str(c) for c in sample["classes"]]
    data = cfg.data
    if data.name == "synthetic":
        return [f"class_{i}" for i in range(int(data.num_classes))]
    if data.name == "cifar10":
        return list(CIFAR10_CLASSES)
    if data.name == "imagefolder" and (Path(str(data.root)).expanduser() / "train").is_dir():
        return class_folders(Path(str(data.root)).expanduser() / "train")
    raise ConfigError(f"{run_dir}: the class names are unknown (no classes in {RUN_RECORD}, no {PER_CLASS_FILE}, "
                      f"and data.root={data.root} is gone).")


def read_input_shape(run_dir: Path, cfg: DictConfig, record: dict, state: dict) -> tuple[int, int, int]:
    """(channels, height, width) of the images the model was trained on."""
    if record.get("input_shape"):
        return tuple(int(v) for v in record["input_shape"])
    first_conv = next((v for v in state.values() if v.dim() == 4), None)
    channels = int(first_conv.shape[1]) if first_conv is not None else 3
    data = cfg.data
    if data.name == "synthetic":
        return channels, int(data.image_size), int(data.image_size)
    if data.name == "imagefolder" and data.get("resize"):
        return channels, int(data.resize), int(data.resize)
    if (run_dir / SAMPLES_FILE).is_file():
        with np.load(run_dir / SAMPLES_FILE) as sample:
            return tuple(int(v) for v in sample["images"].shape[1:])
    return channels, 32, 32  # CIFAR-10


# ---------------------------------------------------------------- the model
def build_model(cfg: DictConfig, in_channels: int, num_classes: int, state: dict, where: Path) -> torch.nn.Module:
    """The model as training built it, with `state` loaded."""
    try:
        locate("model._target_", cfg.model.get("_target_"))  # a module that no longer imports: one line
        with torch.random.fork_rng(devices=[]):  # initial weights are replaced: leave the caller's RNG alone
            model = instantiate_model(cfg.model, in_channels, num_classes)
    except ConfigError as err:
        raise ConfigError(f"{where}: the run's model cannot be built: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ConfigError(f"{where}: the weights do not fit the model the run's config builds ({detail}); the model's "
                          "code changed since the run, or the run was written by an incompatible version.") from None
    return model.eval()


# ---------------------------------------------------------------- the loaded run
@dataclass
class Predictions:
    """Per image: the predicted class name and every class's probability."""

    names: list[str]
    probabilities: torch.Tensor  # (N, classes) on the CPU, columns in LoadedRun.classes order
    classes: list[str]

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """The k most probable (class, probability) pairs of each image."""
        values, index = self.probabilities.topk(min(k, len(self.classes)), dim=1)
        return [[(self.classes[i], float(p)) for p, i in zip(v, ix)] for v, ix in zip(values, index)]


class LoadedRun:
    """A trained run ready to use; see the module docstring."""

    def __init__(self, path: Path, config: DictConfig, record: dict, classes: list[str], weights: Weights,
                 model: torch.nn.Module, preprocess: Preprocessor):
        self.path, self.config, self.record, self.classes = path, config, record, classes
        self.weights, self.model, self.preprocess = weights, model, preprocess
        self.device = preprocess.device
        # Evaluated as training evaluated, to the last bit: its test-time augmentation,
        # precision and memory format, threads and oneDNN setting.
        trainer = config.trainer
        self.tta = str(trainer.get("tta", "none"))
        self.options: StepOptions = step_options(trainer)
        if self.options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        plan = OmegaConf.create({"num_threads": trainer.get("num_threads"), "fast_path": trainer.get("fast_path", True)})
        self.threads = plan_threads(plan, int(config.data.get("batch_size", 4)), self.device, None, self.options)

    def tta_recorded(self) -> str:
        """The test-time augmentation the run's own evaluation of these weights used
        (with trainer.tta_each_epoch=false, only the last epoch's had it)."""
        return epoch_tta(self.config.trainer, self.weights.epoch)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocess.shape

    def inference(self):
        """The CPU settings training evaluated under (restored afterwards)."""
        return cpu_settings(self.threads.eval, self.threads.eval_onednn)

    @torch.inference_mode()
    def logits(self, images, tta: str | None = None) -> torch.Tensor:
        """The model's logits, as training's evaluation computed them (`tta`: the run's unless given)."""
        batch = self.preprocess(images)
        with self.inference():
            return eval_logits(self.model, batch, self.tta if tta is None else tta, self.options).float()

    def predict(self, images, tta: str | None = None) -> Predictions:
        probabilities = torch.softmax(self.logits(images, tta), dim=1).cpu()
        return Predictions([self.classes[i] for i in probabilities.argmax(1).tolist()], probabilities, self.classes)

    def __repr__(self) -> str:
        return (f"LoadedRun({str(self.path)!r}, {self.weights.describe()}, {type(self.model).__name__}, "
                f"{len(self.classes)} classes, input {'x'.join(map(str, self.input_shape))}, {self.device})")


def load_run(path, weights: str = BEST, device: str | torch.device = "auto") -> LoadedRun:
    """Load a trained run: `weights` is "best" (model_best.pt; a run without a
    validation split has none and gives its final weights), "final" or a weights
    file; `device` is "auto" (cuda when available), "cpu", "cuda", "cuda:N"."""
    run_dir = check_run_dir(path)
    cfg = read_config(run_dir)
    record = read_record(run_dir) or {}
    check_compatible(run_dir, cfg, record)
    chosen = choose_weights(run_dir, str(weights), cfg, record)
    state = read_state(chosen)
    classes = read_classes(run_dir, cfg, record)
    shape = read_input_shape(run_dir, cfg, record, state)
    if not isinstance(device, torch.device):
        check_device(str(device))
        device = resolve_device(str(device))
    model = build_model(cfg, shape[0], len(classes), state, run_dir).to(device)
    return LoadedRun(run_dir, cfg, record, classes, chosen, model,
                     Preprocessor(cfg.data.mean, cfg.data.std, shape, device))
