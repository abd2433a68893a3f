"""Structured-config schema: every key cnnexp reads, with its type and default.

The YAML files in conf/ pick values; these dataclasses decide what is allowed.
Hydra checks overrides against them while composing, so `optim.lr=abc` or
`trainer.epochs=3` (a typo) fails before any data is touched, naming the key.
Range checks that a type cannot express live in cnnexp/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DEFAULT_DATA_ROOT = "${oc.env:CNNEXP_DATA_DIR,'~/.cache/cnnexp/data'}"


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


# ---------------------------------------------------------------- optimisers
@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True  # the parameters are bound by the trainer
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


# ---------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    batch_size: int = 4
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
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


@dataclass
class SyntheticConfig(DataConfig):
    name: str = "synthetic"
    n_train: int = 5000
    n_test: int = 1000
    num_classes: int = 10
    image_size: int = 32
    noise: float = 1.0  # std of pixel noise, in units of the pattern range [0, 1]
    seed: int = 0  # fixed apart from trainer.seed, so a seed sweep sees one dataset


@dataclass
class ImageFolderConfig(DataConfig):
    name: str = "imagefolder"
    root: str = MISSING  # holds train/<class>/* and test/<class>/*
    resize: int | None = None  # square side to resize every image to
    cache: bool = True  # keep decoded tensors beside the images for the next run


# ---------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    max_epochs: int = 50
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval_batch_size: int = 1000
    num_threads: int | None = None  # None: training threads timed (autotune.py), all cores for eval
    fast_path: bool = True  # flat-buffer SGD; plain torch.optim when false
    cuda_graph: bool = True  # capture the train step in a CUDA graph on GPUs
    cpu_step: str = "auto"  # auto (time the candidates, cache the fastest) | eager | compiled
    deterministic: bool = False
    lr_schedule: str = "constant"  # constant | cosine
    resume: str | None = None  # a run dir or a checkpoint file
    progress: str = "auto"  # auto | bar | log | none
    log_every_steps: int = 2000
    checkpoint: bool = True
    objective: str = "auto"  # what the run returns to a sweeper; see cnnexp/objective.py


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
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """The schema nodes live in schema/<group>, apart from the groups' options, so
    that Hydra's option lists (and `cnnexp --help`) show only what a user picks.
    A group option extends its node with `- /schema/<group>/<name>@_here_`."""
    cs = ConfigStore.instance()
    cs.store(name="cnnexp_schema", node=Config)
    cs.store(group="schema/model", name="tutorial_cnn", node=TutorialCNNConfig)
    cs.store(group="schema/model", name="wide_cnn", node=WideCNNConfig)
    cs.store(group="schema/optim", name="sgd", node=SGDConfig)
    cs.store(group="schema/optim", name="adam", node=AdamConfig)
    cs.store(group="schema/data", name="cifar10", node=Cifar10Config)
    cs.store(group="schema/data", name="synthetic", node=SyntheticConfig)
    cs.store(group="schema/data", name="imagefolder", node=ImageFolderConfig)
    cs.store(group="schema/trainer", name="default", node=TrainerConfig)
