"""Evaluate a loaded run: on its own test (or validation) split exactly as
training evaluated it, or on other data with the run's preprocessing.

On its own split with the same weights the accuracy is run.json's to the last
bit: the same images (the run's reader and validation split), the same
normalisation, batch size, evaluation code, threads and oneDNN setting.

Other data comes as `data.*` overrides (a `data=<option>` among them picks
another dataset); its class names are matched to the run's by name.
Everything is checked before anything is written to
<run dir>/evaluations/<name>/: eval.json, per_class.csv, confusion.csv and
the confusion figure.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cnnexp.config.schema import SCHEMAS
from cnnexp.data import read_splits, split_validation
from cnnexp.data.imagefolder import IMAGE_SUFFIXES, class_folders, decode_all, list_images
from cnnexp.engine.evaluate import EvalResult, evaluate
from cnnexp.errors import ConfigError, DataError
from cnnexp.figures import plot_confusion
from cnnexp.results.files import (
    CONFUSION_FIGURE,
    CONFUSION_FILE,
    EVAL_FILE,
    EVALUATIONS_DIR,
    METRICS_FILE,
    MODEL_FILE,
    PER_CLASS_FILE,
)
from cnnexp.results.metrics import read_metrics
from cnnexp.results.record import now_iso
from cnnexp.run.outputs import write_confusion, write_per_class
from cnnexp.safeio import write_text
from cnnexp.use.loaded import BEST, LoadedRun
from cnnexp.version import __version__

TTA_CHOICES = ("none", "flip", "flip_translate")  # trainer.tta's, the views of data/augment.py
SPLITS = ("test", "val")
# The only trainer.* keys that matter to an evaluation.
TRAINER_KEYS = ("trainer.eval_batch_size", "trainer.num_threads")
# data.* keys that are the model's preprocessing, not a choice of data.
PREPROCESSING_KEYS = ("data.mean", "data.std")


# ---------------------------------------------------------------- the command line's overrides
@dataclass
class Overrides:
    """KEY=VALUE arguments sorted by what they change."""

    group: str | None = None  # data=<option>
    data: list[str] = field(default_factory=list)  # data.key=value
    trainer: dict[str, int] = field(default_factory=dict)
    given: list[str] = field(default_factory=list)

    @property
    def other_data(self) -> bool:
        return self.group is not None or bool(self.data)


def parse_overrides(items: list[str]) -> Overrides:
    """Sort the overrides; refuse one that would change the model or means nothing here."""
    parsed = Overrides(given=list(items))
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"{item!r} is not KEY=VALUE; give data.* overrides such as data.root=PATH.")
        if key.startswith(("+", "~")):
            raise ConfigError(f"{item!r}: keys cannot be added or removed here; give data.* overrides.")
        if key.startswith(("model", "optim")) or key in PREPROCESSING_KEYS:
            raise ConfigError(f"{item} would change the model or its preprocessing, which come from the run; "
                              "evaluate another run instead, or give data.* overrides only.")
        if key == "data":
            if value not in SCHEMAS["data"]:
                raise ConfigError(f"data={value!r} is not a dataset; use {', '.join(SCHEMAS['data'])}.")
            parsed.group = value
        elif key.startswith("data."):
            parsed.data.append(item)
        elif key in TRAINER_KEYS:
            try:
                parsed.trainer[key.split(".")[1]] = int(value)
            except ValueError:
                raise ConfigError(f"{item}: {key} must be an integer.") from None
            if parsed.trainer[key.split(".")[1]] < 1:
                raise ConfigError(f"{item}: {key} must be >= 1.")
        else:
            raise ConfigError(f"{item}: only data.* overrides (and {', '.join(TRAINER_KEYS)}) apply to an "
                              "evaluation; the rest of the config is the run's.")
    return parsed


def data_config(run: LoadedRun, overrides: Overrides, composed: DictConfig | None = None) -> DictConfig:
    """The data config to evaluate on: the run's, with the overrides applied.
    `composed` is the data node Hydra composed for a `data=<option>` override."""
    if overrides.group is not None:
        base = composed if composed is not None else OmegaConf.structured(SCHEMAS["data"][overrides.group])
    else:
        base = OmegaConf.merge(OmegaConf.structured(SCHEMAS["data"][str(run.config.data.name)]), run.config.data)
    try:
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([o.split(".", 1)[1] for o in overrides.data]))
    except Exception as err:  # a wrong type or a key the dataset does not have
        raise ConfigError(f"{' '.join(overrides.data)}: {str(err).splitlines()[0]}") from None
    missing = [f"data.{k}" for k in cfg if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise ConfigError(f"{missing[0]} is required for data={cfg.name}; add {missing[0]}=...")
    _, height, width = run.input_shape
    if cfg.name == "imagefolder":
        resize = cfg.get("resize")
        if resize is not None and (resize, resize) != (height, width):
            raise ConfigError(f"data.resize={resize} would change the model's input: the run was trained on "
                              f"{width}x{height} images, and evaluation resizes to that; leave data.resize out.")
        if height == width:
            cfg.resize = height  # the run's input size, whatever the images' own
    return cfg


# ---------------------------------------------------------------- the images
@dataclass
class EvalData:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # indices into the run's classes
    described: dict  # for eval.json
    own_split: str | None  # "test" or "val" when these are the run's own images


def own_split_data(run: LoadedRun, split: str) -> EvalData:
    """The run's own test or validation split, read as training read it."""
    cfg = run.config.data
    if split == "val" and not cfg.get("val_size", 0):
        raise ConfigError(f"{run.path} has no validation split (data.val_size=0); use --split test.")
    splits = read_splits(cfg)
    splits = split_validation(splits, cfg.get("val_size", 0), cfg.get("split_seed", 0))
    images, labels = (splits.val_images, splits.val_labels) if split == "val" else (splits.test_images,
                                                                                  splits.test_labels)
    labels = match_classes(splits.classes, run.classes, labels)
    described = {"name": str(cfg.name), "split": split, **_where(cfg), "overrides": [], "images": len(labels)}
    return EvalData(images, labels, described, own_split=split)


def other_data(run: LoadedRun, cfg: DictConfig, overrides: Overrides) -> EvalData:
    """Other data: an image folder (<root>/test/<class>/* or <root>/<class>/*), or
    another reader's test split."""
    if cfg.name == "imagefolder":
        classes, images, labels, folder = read_folder(cfg)
    else:
        splits = read_splits(cfg)
        classes, images, labels, folder = splits.classes, splits.test_images, splits.test_labels, None
    if tuple(images.shape[1:]) != tuple(run.input_shape):
        raise ConfigError(f"The images are {'x'.join(map(str, images.shape[1:]))} (channels x height x width) but "
                          f"the run was trained on {'x'.join(map(str, run.input_shape))}; change the data.* "
                          "overrides to give that size.")
    labels = match_classes(classes, run.classes, labels)
    described = {"name": str(cfg.name), "split": "test", **_where(cfg), "overrides": overrides.given,
                 "images": len(labels), "classes": classes}
    if folder is not None:
        described["folder"] = str(folder)
    return EvalData(images, labels, described, own_split=None)


def read_folder(cfg: DictConfig) -> tuple[list[str], torch.Tensor, torch.Tensor, Path]:
    """Class folders under root/test/ if there is one, else under root itself."""
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={cfg.root!r} is not a folder; give one holding <class>/ folders of images "
                          "(or test/<class>/).")
    folder = root / "test" if (root / "test").is_dir() else root
    classes = class_folders(folder)
    if not classes:
        raise ConfigError(f"data.root={cfg.root!r}: {folder} holds no class folders; put the images into "
                          "<class>/ folders named like the run's classes.")
    present = [c for c in classes if any(p.suffix.lower() in IMAGE_SUFFIXES for p in (folder / c).iterdir())]
    files, labels = list_images(folder, present)
    return present, decode_all(files, cfg.get("resize")), torch.tensor(labels, dtype=torch.int64), folder


def match_classes(data_classes: list[str], run_classes: list[str], labels: torch.Tensor) -> torch.Tensor:
    """Labels of the data's classes as indices into the run's, matched by name."""
    if list(data_classes) == list(run_classes):
        return labels
    unknown = [c for c in data_classes if c not in run_classes]
    if unknown:
        shown = ", ".join(run_classes[:12]) + (", ..." if len(run_classes) > 12 else "")
        raise ConfigError(f"The data's classes {', '.join(unknown[:5])} are not among the run's classes ({shown}); "
                          "name the class folders like the run's classes.")
    index = torch.tensor([run_classes.index(c) for c in data_classes], dtype=torch.int64)
    return index[labels]


def _where(cfg: DictConfig) -> dict:
    return {"root": str(cfg.root)} if "root" in cfg else {}


# ---------------------------------------------------------------- evaluating
def evaluate_on(run: LoadedRun, data: EvalData, tta: str, batch_size: int | None = None) -> EvalResult:
    """The evaluation of training (engine/evaluate.py): its batch size, precision,
    memory format, threads and oneDNN setting, on the run's device."""
    size = batch_size or int(run.config.trainer.get("eval_batch_size", 1000))
    with run.inference():
        return evaluate(run.model, data.images.to(run.device), data.labels.to(run.device), size, len(run.classes),
                        run.preprocess.normalize, tta=tta, options=run.options)


def expected_accuracy(run: LoadedRun, split: str) -> tuple[float, str] | None:
    """What the run itself recorded for these weights on this split, and where."""
    column = f"{split}_acc"
    if run.weights.choice == BEST and split == "test" and run.record.get("test_acc_at_best") is not None:
        return float(run.record["test_acc_at_best"]), "run.json test_acc_at_best"
    if run.weights.file.name == MODEL_FILE and split == "test" and run.record.get("final_test_acc") is not None:
        return float(run.record["final_test_acc"]), "run.json final_test_acc"
    metrics, _ = read_metrics(run.path / METRICS_FILE)
    if run.weights.epoch is None or metrics is None or column not in metrics:
        return None
    row = metrics[metrics["epoch"] == run.weights.epoch]
    return (float(row[column].iloc[-1]), f"metrics.csv {column} of epoch {run.weights.epoch}") if len(row) else None


# ---------------------------------------------------------------- writing it down
def evaluation_name(run: LoadedRun, data: EvalData, tta: str) -> str:
    """test-best, val-final-flip, imagefolder-new_photos-best, ..."""
    if data.own_split:
        what = data.own_split
    elif data.described.get("root"):
        what = f"{data.described['name']}-{Path(data.described['root']).expanduser().name}"
    else:
        digest = hashlib.sha256(" ".join(data.described["overrides"]).encode()).hexdigest()[:8]
        what = f"{data.described['name']}-{digest}"
    weights = run.weights.choice if run.weights.choice != "file" else run.weights.file.stem
    name = "-".join([what, weights, *([f"tta_{tta}"] if tta != run.tta else [])])
    return re.sub(r"[^\w.-]+", "_", name)


def write_evaluation(run: LoadedRun, data: EvalData, result: EvalResult, out: Path, info: dict) -> dict:
    """eval.json, per_class.csv, confusion.csv and the confusion figure in `out`."""
    record = {
        "run_dir": str(run.path),
        "accuracy": result.accuracy,
        "loss": result.loss,
        "images": int(data.labels.numel()),
        "correct": int(result.confusion.trace()),
        "weights": {"choice": run.weights.choice, "file": str(run.weights.file), "epoch": run.weights.epoch,
                    **({"note": run.weights.note} if run.weights.note else {})},
        "data": data.described,
        **info,
        "device": str(run.device),
        "cnnexp_version": __version__,
        "evaluated_at": now_iso(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_per_class(out / PER_CLASS_FILE, result.confusion, run.classes)
    write_confusion(out / CONFUSION_FILE, result.confusion, run.classes)
    write_text(out / EVAL_FILE, json.dumps(record, indent=2) + "\n")
    try:
        plot_confusion(out / CONFUSION_FILE, out / CONFUSION_FIGURE)
    except (OSError, ValueError):  # a figure never fails an evaluation
        pass
    return record


@dataclass
class Evaluation:
    """What `evaluate_run` did: the result, where it went, and the check against the run's record."""

    record: dict
    out: Path

    def line(self) -> str:
        r = self.record
        what = (f"its {r['data']['split']} split" if not r["data"]["overrides"]
                else f"{r['data']['name']} {r['data'].get('root', '')}".strip())
        text = (f"{r['run_dir']}: {r['weights_described']} on {what} ({r['images']} images"
                f"{'' if r['tta'] == 'none' else ', TTA ' + r['tta']}): accuracy {r['accuracy']:.4f}, loss {r['loss']:.4f}")
        check = r.get("reproduces")
        if check:
            verdict = "reproduced exactly" if check["exact"] else "DIFFERS"
            text += f"; {check['source']} {check['accuracy']:.4f}: {verdict}"
        return text + f". Written to {self.out}"


def evaluate_run(run: LoadedRun, overrides: Overrides, composed: DictConfig | None = None, split: str = "test",
                 tta: str | None = None, name: str | None = None) -> Evaluation:
    """Evaluate and write evaluations/<name>/; every check comes before the first file.
    `tta`: test-time augmentation, the run's own (trainer.tta) unless given."""
    tta = run.tta if tta is None else tta
    if tta not in TTA_CHOICES:
        raise ConfigError(f"--tta {tta!r} is not allowed; use {' or '.join(TTA_CHOICES)}.")
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not allowed; use {' or '.join(SPLITS)}.")
    if overrides.other_data and split != "test":
        raise ConfigError("--split val applies to the run's own data only; other data is evaluated on its test "
                          "images.")
    if overrides.other_data:
        data = other_data(run, data_config(run, overrides, composed), overrides)
    else:
        data = own_split_data(run, split)
    if not data.labels.numel():
        raise DataError("No images to evaluate.")
    if "num_threads" in overrides.trainer:
        run.threads.eval = overrides.trainer["num_threads"]
    result = evaluate_on(run, data, tta, overrides.trainer.get("eval_batch_size"))
    info = {"tta": tta, "batch_size": overrides.trainer.get("eval_batch_size")
            or int(run.config.trainer.get("eval_batch_size", 1000)), "weights_described": run.weights.describe()}
    expected = expected_accuracy(run, data.own_split) if data.own_split and tta == run.tta_recorded() else None
    if expected is not None:
        info["reproduces"] = {"source": expected[1], "accuracy": expected[0], "exact": expected[0] == result.accuracy}
    out = run.path / EVALUATIONS_DIR / (name or evaluation_name(run, data, tta))
    return Evaluation(write_evaluation(run, data, result, out, info), out)
