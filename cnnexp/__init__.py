"""cnnexp: train image classifiers from composable Hydra configs.

    python -m cnnexp                              # the original CIFAR-10 tutorial experiment
    python -m cnnexp data=synthetic trainer.max_epochs=2   # offline demo
    python -m cnnexp -m optim.lr=0.001,0.01       # a sweep, summarised in its root

How the package is laid out: docs/architecture.md.
"""

from cnnexp.version import __version__

__all__ = ["__version__"]
