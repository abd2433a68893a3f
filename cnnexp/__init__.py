"""cnnexp: train image classifiers from composable Hydra configs.

    python -m cnnexp                              # the original CIFAR-10 tutorial experiment
    python -m cnnexp data=synthetic trainer.max_epochs=2   # offline demo
    python -m cnnexp -m optim.lr=0.001,0.01       # a sweep, summarised in its root

    import cnnexp
    run = cnnexp.load_run("outputs/2026-11-28/16-05-12")   # a trained run: docs/using-a-trained-model.md

How the package is laid out: docs/architecture.md.
"""

import importlib

from cnnexp.version import __version__

__all__ = ["__version__", "load_run"]


def __getattr__(name: str):
    # cnnexp.load_run is cnnexp.use.load_run, imported on first use: `import cnnexp`
    # stays light (no torch, no Hydra), and the base stage imports no later one.
    if name == "load_run":
        return importlib.import_module("cnnexp.use").load_run
    raise AttributeError(f"module 'cnnexp' has no attribute {name!r}")
