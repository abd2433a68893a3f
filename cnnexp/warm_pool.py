"""Work a sweep's parent process hands to the sweep's warm worker processes.

A joblib sweep's workers import torch while the command composes
(run/warm_workers.py). The parent would import torch too, only to check every
job's `_target_` before the first job starts, and matplotlib and pandas only
to draw the comparison plots after the last one: seconds of a 2-core
machine spent on imports the workers have already paid for. `call` runs such
work in one of the warm workers, and in this process when there are none
(the basic launcher, SLURM, a plain run) or when the pool cannot take it, so
the result never depends on where it ran.

Work sent here must be a module-level function of plain, picklable arguments
that writes nothing a worker's state would misdirect (a worker's logging
still points into the job it ran last): it returns what the parent reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cnnexp.errors import CnnexpError

T = TypeVar("T")

# joblib.Parallel's arguments for the warm pool, once one is being started.
_pool_arguments: dict | None = None


def offer(parallel_arguments: dict) -> None:
    """The pool started with these joblib.Parallel arguments takes work from now on."""
    global _pool_arguments
    _pool_arguments = dict(parallel_arguments)


def withdraw() -> None:
    global _pool_arguments
    _pool_arguments = None


def call(function: Callable[..., T], *args) -> T:
    """function(*args), in a warm worker when there is one, else here.
    A CnnexpError it raises reaches the caller either way."""
    if _pool_arguments is None:
        return function(*args)
    try:
        from joblib import Parallel, delayed

        (result,) = Parallel(**_pool_arguments)([delayed(function)(*args)])
    except CnnexpError:
        raise
    except Exception:  # noqa: BLE001 - the pool is gone or cannot take the work: do it here, as without one
        return function(*args)
    return result
