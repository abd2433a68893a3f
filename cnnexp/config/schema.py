"""Structured-config schema: every key cnnexp reads, with its type, default and check.

These dataclasses are the one place a key is defined: its type and default,
the range check a type cannot express (`key(..., check=..., allowed=...)`,
run by config/checks.py before any work), and whether a resumed run may
change it (`resumable=True`, read by run/resume.py). The YAML options in
conf/ only pick values that differ from these defaults. Hydra checks
overrides against the types while composing, so `optim.lr=abc` or
`trainer.epochs=3` (a typo) fails before any data is touched, naming the key.

To add a key: one field here (default, check, resumable) and, where a group
option wants another value, one line in its YAML file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DEFAULT_DATA_ROOT = "${oc.env:CNNEXP_DATA_DIR,'~/.cache/cnnexp/data'}"


def key(default: Any = MISSING, check: Callable[[Any], bool] | None = None, allowed: str = "",
        resumable: bool = False, choices: tuple[str, ...] | None = None):
    """A schema field: `check(value)` must hold (else "KEY=VALUE is not allowed:
    ALLOWED."); `choices` is the common check of a fixed set of words;
    `resumable` keys may differ on the command line of trainer.resume."""
    if choices is not None:
        check = check or (lambda v, c=choices: v in c)
        allowed = allowed or "use " + ", ".join(choices[:-1]) + " or " + choices[-1]
    meta = {"check": check, "allowed": allowed, "resumable": resumable}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def positive(v) -> bool:
    return v > 0


def at_least(n):
    return lambda v: v >= n


def is_seed(v) -> bool:
    return 0 <= v < 2**32


# ---------------------------------------------------------------- models
# in_channels and num_classes are not keys: they come from the dataset.
@dataclass
class TutorialCNNConfig:
    _target_: str = "cnnexp.models.TutorialCNN"


@dataclass
class WideCNNConfig:
    _target_: str = "cnnexp.models.WideCNN"
    width: int = 32  # channels of the first block; doubled per block
    dropout: float = 0.1


@dataclass
class ResNet18Config:
    _target_: str = "cnnexp.models.ResNet18"  # the CIFAR variant: 3x3 stem, no max-pool


@dataclass
class TimmConfig:
    _target_: str = "cnnexp.models.TimmModel"
    name: str = "resnet18"  # any timm.list_models() name, built with pretrained=False


@dataclass
class Fast94NetConfig:
    _target_: str = "cnnexp.models.Fast94Net"  # patch-whitening stem, three conv blocks, batch norm, GELU
    widths: list[int] = key([64, 256, 256], lambda v: len(v) == 3 and all(w >= 1 for w in v),
                            "three block widths >= 1")
    # the batch-norm shifts learn this many times faster (their weight decay is divided by it)
    norm_bias_lr_scale: float = key(64.0, lambda v: v > 0, "a factor > 0")


# ---------------------------------------------------------------- optimisers
@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True  # the parameters are bound by the trainer
    lr: float = key(0.001, positive, "the learning rate must be > 0")
    momentum: float = key(0.9, lambda v: 0 <= v < 1, "momentum must be in [0, 1)")
    weight_decay: float = key(0.0, at_least(0), "weight decay must be >= 0")
    nesterov: bool = False


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = key(0.001, positive, "the learning rate must be > 0")
    betas: list[float] = key([0.9, 0.999], lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                             "two values in [0, 1)")
    weight_decay: float = key(0.0, at_least(0), "weight decay must be >= 0")


# ---------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    batch_size: int = key(4, at_least(1), "the batch size must be >= 1")
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # (x - 0.5) / 0.5: [0, 1] -> [-1, 1]
    std: list[float] = key([0.5, 0.5, 0.5], lambda v: all(x > 0 for x in v), "every std must be > 0")
    # Training images held out for validation: a count (5000) or a fraction in (0, 1)
    # (0.1); 0 holds none. Stratified per class, drawn from split_seed alone.
    val_size: float = 0
    split_seed: int = 0


@dataclass
class Cifar10Config(DataConfig):
    name: str = "cifar10"
    root: str = DEFAULT_DATA_ROOT
    download: bool = True
    url: str = CIFAR10_URL
    md5: str = CIFAR10_MD5
    # a stratified subset drawn from data.split_seed; null: every image
    n_train: int | None = key(None, lambda v: v is None or (1 <= v <= 50000), "null (all 50000) or 1..50000")
    n_test: int | None = key(None, lambda v: v is None or (1 <= v <= 10000), "null (all 10000) or 1..10000")


@dataclass
class SyntheticConfig(DataConfig):
    name: str = "synthetic"
    n_train: int = key(5000, at_least(1), "at least 1 training image")
    n_test: int = key(1000, at_least(1), "at least 1 test image")
    num_classes: int = key(10, at_least(2), "at least 2 classes")
    image_size: int = key(32, at_least(8), "at least 8 pixels")
    # std of pixel noise, in units of the pattern range [0, 1]
    noise: float = key(1.0, at_least(0), "a noise level >= 0")
    seed: int = key(0, is_seed, "a seed in [0, 2**32)")  # apart from trainer.seed: a seed sweep sees one dataset


@dataclass
class ImageFolderConfig(DataConfig):
    name: str = "imagefolder"
    root: str = MISSING  # holds train/<class>/* and test/<class>/*
    # square side to resize every image to (32 for the tutorial net)
    resize: int | None = key(None, lambda v: v is None or v >= 1, "null or a size >= 1")
    cache: bool = True  # keep decoded tensors beside the images for the next run
    # a stratified subset drawn from data.split_seed; null: every image
    n_train: int | None = key(None, lambda v: v is None or v >= 1, "null (all) or >= 1")
    n_test: int | None = key(None, lambda v: v is None or v >= 1, "null (all) or >= 1")


# ---------------------------------------------------------------- augmentation
# Applied to the training images only, per epoch, as tensor operations on the device.
@dataclass
class AugmentConfig:
    flip: bool = False  # random horizontal flip
    # with flip: each image mirrored in every other epoch (from a random start) instead of a coin toss per epoch
    alternate_flip: bool = False
    translate: int = key(0, lambda v: 0 <= v <= 16, "a shift of 0..16 pixels")  # random crop with this padding
    cutout: int = key(0, lambda v: 0 <= v <= 32, "a square side of 0..32 pixels")  # one zeroed square


@dataclass
class EarlyStoppingConfig:
    patience: int = key(0, at_least(0), "0 (off) or the epochs without improvement to wait")
    min_delta: float = key(0.0, at_least(0), "an improvement >= 0")
    # auto: val_acc with a validation split, else test_acc (with a warning)
    monitor: str = key("auto", choices=("auto", "val_acc", "val_loss", "test_acc", "test_loss"))


# ---------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    max_epochs: int = key(50, at_least(1), "train at least 1 epoch", resumable=True)
    # auto (cuda when available, else cpu) | cpu | cuda | cuda:N | mps; checked in config/checks.py
    device: str = key("auto", resumable=True)
    seed: int = key(0, is_seed, "a seed in [0, 2**32)")
    # evaluation batch; training uses data.batch_size
    eval_batch_size: int = key(1000, at_least(1), "must be >= 1", resumable=True)
    # None: training threads timed at the start of a CPU run (engine/autotune.py), all cores for eval
    num_threads: int | None = key(None, lambda v: v is None or v >= 1, "null (automatic) or >= 1", resumable=True)
    fast_path: bool = True  # flat-buffer SGD; plain torch.optim when false
    cuda_graph: bool = True  # capture the train step in a CUDA graph on GPUs
    # auto: the faster of the eager and the compiled step, timed and cached; or eager / compiled
    cpu_step: str = key("auto", choices=("auto", "eager", "compiled"), resumable=True)
    deterministic: bool = False
    # constant, cosine (per epoch, as before); onecycle, linear, step: per step; any with warmup_epochs
    lr_schedule: str = key("constant", choices=("constant", "cosine", "onecycle", "linear", "step"))
    warmup_epochs: float = key(0.0, at_least(0), "0 or more epochs of linear warmup")
    # the warmup's first rate and the rate cosine, linear and onecycle end at, as fractions of optim.lr
    warmup_start_factor: float = key(0.0, lambda v: 0 <= v <= 1, "a fraction of optim.lr in [0, 1]")
    final_lr_factor: float = key(0.0, lambda v: 0 <= v <= 1, "a fraction of optim.lr in [0, 1]")
    label_smoothing: float = key(0.0, lambda v: 0 <= v < 1, "a value in [0, 1)")
    decay_norm_and_bias: bool = True  # false: optim.weight_decay skips norm weights and biases
    ema_decay: float = key(0.0, lambda v: 0 <= v < 1, "0 (off) or a decay in (0, 1), e.g. 0.99")
    # every N steps the slow weights move towards the training weights, which restart from them (engine/lookahead.py)
    lookahead_every: int = key(0, at_least(0), "0 (off) or the steps between lookahead updates, e.g. 5")
    lookahead_decay: float = key(0.774, lambda v: 0 <= v < 1, "the slow weights' decay at the end, in [0, 1)")
    precision: str = key("32", choices=("32", "bf16", "16-mixed"))
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (eager step only)
    tta: str = key("none", choices=("none", "flip", "flip_translate"))  # test-time augmentation
    # false: the test-time augmentation only in the last epoch's evaluation (the earlier rows without it)
    tta_each_epoch: bool = True
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    resume: str | None = None  # a run dir or a checkpoint file to continue from
    progress: str = key("auto", choices=("auto", "bar", "log", "none"), resumable=True)
    # the figures drawn at the end: every one, only plots/overview.png, or none (python -m cnnexp.plot draws them later)
    plots: str = key("all", choices=("all", "final", "none"), resumable=True)
    # true: a background process draws them after the command returns (a second or two later)
    plots_in_background: bool = key(False, resumable=True)
    log_every_steps: int = key(2000, at_least(1), "must be >= 1", resumable=True)
    checkpoint: bool = True
    # what the run returns to a sweeper (results/objective.py); it does not change how the run trains
    objective: str = key("auto", resumable=True)


# ---------------------------------------------------------------- live tracking
# conf/logger/ switches the trackers on (logger=tensorboard, mlflow, all or a
# list); the CSVs in the run dir stay the record either way.
@dataclass
class LoggerConfig:
    tensorboard: bool = False  # event files in <run dir>/tensorboard/<overrides>/
    mlflow: bool = False  # one MLflow run per cnnexp run
    tracking_uri: str | None = None  # MLflow; null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment_name: str = "cnnexp"  # MLflow experiment the runs go into
    log_model: bool = False  # MLflow: upload model.pt (and model_best.pt) as artifacts too
    log_figures: bool = True  # the final plots: TensorBoard images, MLflow artifacts


@dataclass
class Config:
    model: Any = MISSING
    optim: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # What to call the run (or the sweep) in run.json, summaries and trackers; null: named by its overrides.
    # Usable in the output dir pattern: hydra.run.dir='outputs/${name}'.
    name: str | None = key(None, lambda v: v is None or v.strip() != "", "null, or a name that is not blank")
    tags: list[str] = field(default_factory=list)  # labels to find and group runs by: tags=[baseline,wide]
    notes: str = ""  # free text: why this run was made


# The schema node of every group option: conf/<group>/<name>.yaml extends
# schema/<group>/<name>. A new option of a group is one entry here.
SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"tutorial_cnn": TutorialCNNConfig, "wide_cnn": WideCNNConfig, "resnet18": ResNet18Config,
              "timm": TimmConfig, "fast94_net": Fast94NetConfig},
    "optim": {"sgd": SGDConfig, "adam": AdamConfig},
    "data": {"cifar10": Cifar10Config, "synthetic": SyntheticConfig, "imagefolder": ImageFolderConfig},
    "trainer": {"default": TrainerConfig},
    "augment": {"none": AugmentConfig, "flip_crop": AugmentConfig, "cutout": AugmentConfig},
}


def register_configs() -> None:
    """The schema nodes live in schema/<group>, apart from the groups' options, so
    that Hydra's option lists (and `cnnexp --help`) show only what a user picks.
    A group option extends its node with `- /schema/<group>/<name>@_here_`."""
    cs = ConfigStore.instance()
    cs.store(name="cnnexp_schema", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


GROUP_SCHEMAS = {"trainer": TrainerConfig, "logger": LoggerConfig}


def resumable_keys() -> list[str]:
    """The keys a resumed run may change (trainer.resume's command line), in schema order."""
    return [f"{group}.{f.name}" for group, schema in GROUP_SCHEMAS.items() for f in dataclasses.fields(schema)
            if f.metadata.get("resumable")]


def field_checks(group: str) -> dict[str, tuple[Callable[[Any], bool], str]]:
    """name -> (check, allowed) of every checked key of a group's options: a key
    is checked wherever it appears in the group (momentum under any optimiser)."""
    checks = {}
    for node_type in SCHEMAS.get(group, {}).values():
        for f in dataclasses.fields(node_type):
            if f.metadata.get("check") is not None:
                checks.setdefault(f.name, (f.metadata["check"], f.metadata["allowed"]))
    return checks
