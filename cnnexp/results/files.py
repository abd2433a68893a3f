"""The names of what a run directory and a sweep directory hold: the one place they are written.

    <run dir>/                              <sweep dir>/
      .hydra/config.yaml overrides.yaml       multirun.yaml
      cnnexp.log                              summary.csv, plots/*.png
      run.json          how the run ended     search.yaml, optuna.db, best.txt  (a search)
      metrics.csv       one row per epoch     0/, 1/, ...  one run dir per job
      checkpoints/last.pt   resumable state
      model.pt, model_best.pt
      per_class.csv, confusion.csv, predictions_sample.npz
      plots/*.png
      evaluations/<name>/eval.json ...  python -m cnnexp.evaluate
      exported/                         python -m cnnexp.export
"""

from __future__ import annotations

# ---------------------------------------------------------------- a run
HYDRA_DIR = ".hydra"
CONFIG_FILE = ".hydra/config.yaml"  # the composed config, as Hydra saved it
OVERRIDES_FILE = ".hydra/overrides.yaml"
LOG_FILE = "cnnexp.log"
RUN_RECORD = "run.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_NAME = "checkpoints/last.pt"
MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "model_best.pt"  # the selected epoch's weights (runs with a validation split)
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion.csv"
SAMPLES_FILE = "predictions_sample.npz"  # test images with true and predicted classes
PLOTS_DIR = "plots"
# Any of these makes a directory a run's (python -m cnnexp.plot tells runs from sweeps by them).
RUN_MARKERS = (METRICS_FILE, RUN_RECORD, CONFIG_FILE, CHECKPOINT_NAME)
# After training (cnnexp/use/): evaluations/<name>/ per evaluation, exported/ per export.
EVALUATIONS_DIR = "evaluations"
EVAL_FILE = "eval.json"
CONFUSION_FIGURE = "confusion_matrix.png"
EXPORT_DIR = "exported"

# ---------------------------------------------------------------- a sweep or search
MULTIRUN_FILE = "multirun.yaml"
SUMMARY_FILE = "summary.csv"
SEARCH_FILE = "search.yaml"  # its presence makes a sweep dir an Optuna search
STUDY_DB = "optuna.db"
STUDY_JOURNAL = "optuna.journal"  # the study as a journal file (hydra.sweeper.storage=journal)
ASK_LOCK = ".search-ask"  # held while a search worker asks the study for its next trial
BEST_FILE = "best.txt"

# ---------------------------------------------------------------- a comparison (python -m cnnexp.compare)
COMPARISON_FILE = "comparison.csv"
