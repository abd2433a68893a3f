"""What the commands evaluate, predict and export share: the run argument with
--weights, --best and --device, and errors as one line with an exit code
(2 for bad input, with nothing written)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cnnexp.errors import CnnexpError
from cnnexp.use.loaded import BEST, FINAL, LoadedRun, load_run
from cnnexp.use.selection import best_job


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error here."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parser(prog: str, doc: str) -> OneLineParser:
    lines = doc.strip().splitlines()
    result = OneLineParser(prog=prog, description=lines[0], epilog="\n".join(lines[1:]),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("path", type=Path, help="a run directory (or, with --best, a sweep or search directory)")
    result.add_argument("--weights", default=BEST, metavar="best|final|FILE",
                        help=f"{BEST}: the epoch selected by validation (model_best.pt; a run without a validation "
                             f"split has none: its final weights, said on stderr); {FINAL}: the last epoch's; "
                             "or a weights file (default: best)")
    result.add_argument("--best", action="store_true",
                        help="PATH is a sweep or search: use the job its ranking selected")
    result.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N, mps")
    return result


def load(args: argparse.Namespace, prog: str) -> LoadedRun:
    """The run the arguments name, saying on stderr which job --best chose and
    when the weights are not the ones asked for."""
    path = args.path
    if args.best:
        path, how = best_job(path)
        print(f"{prog}: {how}: {path}", file=sys.stderr)
    run = load_run(path, weights=args.weights, device=args.device)
    if run.weights.note:
        print(f"{prog}: note: {run.weights.note}", file=sys.stderr)
    return run


def run_command(prog: str, body: Callable[[], int]) -> int:
    """body's exit code; a CnnexpError is one line on stderr and its exit code."""
    try:
        return body()
    except CnnexpError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: stopped", file=sys.stderr)
        return 130
