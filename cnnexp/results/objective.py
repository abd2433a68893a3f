"""The number that judges a run: what a search optimises, and which epoch a run keeps.

`trainer.objective` names it. Each objective reads one metrics.csv column
and is either the best value over the epochs so far (`best_*`) or the value
of the last epoch (`final_*`):

    best_val_acc      maximize   highest validation accuracy of any epoch
    final_val_acc     maximize   validation accuracy after the last epoch
    best_val_loss     minimize   lowest validation loss of any epoch
    final_val_loss    minimize   validation loss after the last epoch
    final_test_acc    maximize   test accuracy after the last epoch
    final_test_loss   minimize   test loss after the last epoch
    final_train_loss  minimize   mean training loss of the last epoch
    auto              best_val_acc with a validation split (data.val_size > 0),
                      else final_test_loss

The `*_val_*` objectives need a validation split. Without one, a search can
only be judged on the test split, which then stops being an unbiased
estimate: cnnexp allows it (final_test_* and auto) but says so in the log.
No `best_test_*` objective exists: picking the best epoch on the test split
is exactly what a validation split is for.

Model selection is separate from the objective: with a validation split the
selected epoch is always the one with the highest validation accuracy (the
first of equals); its weights are model_best.pt and its test accuracy is the
number to report.

    from cnnexp.results import objective
    name = objective.from_config(cfg)            # "auto" resolved, checked
    objective.direction(name)                    # "maximize" | "minimize"
    objective.epoch_value(name, rows)            # after each epoch, for a pruner
    objective.final_value(name, rows)            # the run's result
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cnnexp.errors import ConfigError

AUTO = "auto"
SELECTED_BY = "val_acc"  # the column that selects a run's best epoch


@dataclass(frozen=True)
class Objective:
    column: str  # the metrics.csv column it reads
    maximize: bool
    best: bool  # best over the epochs so far (else the last epoch's value)

    @property
    def needs_split(self) -> bool:
        return self.column.startswith("val_")


OBJECTIVES = {
    "best_val_acc": Objective("val_acc", maximize=True, best=True),
    "final_val_acc": Objective("val_acc", maximize=True, best=False),
    "best_val_loss": Objective("val_loss", maximize=False, best=True),
    "final_val_loss": Objective("val_loss", maximize=False, best=False),
    "final_test_acc": Objective("test_acc", maximize=True, best=False),
    "final_test_loss": Objective("test_loss", maximize=False, best=False),
    "final_train_loss": Objective("train_loss", maximize=False, best=False),
}
AUTO_WITH_SPLIT, AUTO_WITHOUT_SPLIT = "best_val_acc", "final_test_loss"


def names() -> list[str]:
    return [AUTO, *OBJECTIVES]


def resolve(name: str, has_split: bool) -> str:
    """The concrete objective for trainer.objective=name; ConfigError if it cannot be used."""
    if name == AUTO:
        return AUTO_WITH_SPLIT if has_split else AUTO_WITHOUT_SPLIT
    if name not in OBJECTIVES:
        raise ConfigError(f"trainer.objective={name!r} is not allowed: use one of {', '.join(names())}.")
    if OBJECTIVES[name].needs_split and not has_split:
        raise ConfigError(
            f"trainer.objective={name!r} needs a validation split, but data.val_size=0. Hold out images with "
            "data.val_size=N (a count) or a fraction such as data.val_size=0.1, or choose a final_test_* objective."
        )
    return name


def from_config(cfg) -> str:
    """The resolved objective of a composed config (cfg.trainer.objective, cfg.data.val_size)."""
    return resolve(str(cfg.trainer.get("objective", AUTO)), has_split=bool(cfg.data.get("val_size", 0)))


def _spec(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; resolve 'auto' first (objective.resolve or from_config)")
    return OBJECTIVES[name]


def direction(name: str) -> str:
    """"maximize" or "minimize", in Optuna's words."""
    return "maximize" if _spec(name).maximize else "minimize"


def is_better(name: str, value: float, than: float) -> bool:
    """True when value beats `than` in the objective's direction (NaN never beats anything)."""
    if math.isnan(value):
        return False
    if math.isnan(than):
        return True
    return value > than if _spec(name).maximize else value < than


def epoch_value(name: str, rows: Sequence[Mapping]) -> float:
    """The objective after the last of `rows` (metrics rows, oldest first): what a
    pruner hears after each epoch. For best_* it is the best so far, so it never
    gets worse; NaN when there are no rows or the column is missing."""
    spec = _spec(name)
    if not spec.best:
        last = rows[-1].get(spec.column) if rows else None
        return math.nan if last in (None, "") else float(last)
    values = [float(row[spec.column]) for row in rows if row.get(spec.column) not in (None, "")]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan
    return max(values) if spec.maximize else min(values)


def final_value(name: str, rows: Sequence[Mapping]) -> float:
    """The run's objective from all its metrics rows: the value after its last epoch."""
    return epoch_value(name, rows)


def record_fields(name: str, rows: Sequence[Mapping]) -> dict:
    """run.json's account of the objective and, with a validation split, of the
    selected epoch: best_epoch, best_val_acc, test_acc_at_best, selected_by."""
    value = final_value(name, rows)
    fields = {"objective": name, "objective_value": None if math.isnan(value) else value}  # JSON has no NaN
    best = selected_row(rows)
    if best is not None:
        fields.update(selected_by=SELECTED_BY, best_epoch=int(best["epoch"]),
                      best_val_acc=float(best["val_acc"]), test_acc_at_best=float(best["test_acc"]))
    return fields


def completed_fields(name: str, rows: Sequence[Mapping]) -> dict:
    """run.json's account of a completed run: record_fields, and without a
    validation split the best test epoch (reported, never used to select)."""
    fields = record_fields(name, rows)
    if "selected_by" not in fields:
        best = best_row(rows, "test_acc")
        if best is not None:
            fields.update(best_test_acc=float(best["test_acc"]), best_epoch=int(best["epoch"]))
    return fields


def selected_row(rows: Sequence[Mapping]) -> Mapping | None:
    """The epoch a run with a validation split selects: highest val_acc, the first
    of equals; None without validation columns."""
    return best_row(rows, SELECTED_BY)


def best_row(rows: Sequence[Mapping], column: str) -> Mapping | None:
    """The row with the highest value of `column`, the first of equals; rows
    without a value are passed over. The one selection rule every stage uses."""
    best = None
    for row in rows:
        value = row.get(column)
        if value in (None, "") or math.isnan(float(value)):
            continue
        if best is None or float(value) > float(best[column]):
            best = row
    return best
