"""`--tree DIR` for the benchmarks that run cnnexp as a command: time other
source trees (an older checkout, say) side by side with this one, in the
same rounds, by putting each tree first on the children's PYTHONPATH."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path


def add_tree_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tree", action="append", default=[],
                        help="a cnnexp source tree to time instead of the installed one (repeatable: the "
                             "trees run interleaved, side by side)")


def tree_environments(tree_args: list[str], before: Sequence[str] = (), **variables: str) -> dict[str, dict]:
    """The environment of each tree's commands, by its resolved path ("" for the
    installed cnnexp when no --tree is given): `before` paths, then the tree, then
    the PYTHONPATH already set; `variables` added."""
    trees = [str(Path(t).resolve()) for t in tree_args] or [""]
    return {tree: dict(os.environ, **variables, PYTHONPATH=os.pathsep.join(
                filter(None, [*before, tree, os.environ.get("PYTHONPATH")])))
            for tree in trees}
