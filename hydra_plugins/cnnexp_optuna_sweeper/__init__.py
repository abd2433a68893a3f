"""cnnexp's Optuna sweeper for Hydra: `cnnexp -m hydra/sweeper=optuna ...`.

Hydra finds it because it lives in the `hydra_plugins` namespace package.
config.py registers `hydra/sweeper=optuna`; optuna_sweeper.py is the plugin
class; the modules whose names start with an underscore (which Hydra's
plugin scan skips, so Optuna is imported only when a search runs) hold the
search space (_space.py), the checks and the start of the workers
(_search.py) and the workers that take trials from the study (_worker.py).
"""
