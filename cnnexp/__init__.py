"""cnnexp: train image classifiers from composable Hydra configs.

    python -m cnnexp                              # the original CIFAR-10 tutorial experiment
    python -m cnnexp data=synthetic trainer.max_epochs=2   # offline demo
    python -m cnnexp -m optim.lr=0.001,0.01       # a sweep, summarised in its root
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnexp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
