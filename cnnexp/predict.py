"""Predict classes of image files with a trained run:

    python -m cnnexp.predict RUN_DIR photo.jpg more_photos/ --top-k 3 --out predictions.csv

Files and folders (searched recursively), any size and colour mode: each is
decoded and resized as the run's training images were. One CSV row per image
(path, the top-k classes and probabilities, or the error of an unreadable
file). More: docs/using-a-trained-model.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cnnexp.errors import ConfigError
from cnnexp.use.commandline import load, parser, run_command
from cnnexp.use.prediction import image_files, predict_files, table, write_csv

PROG = "python -m cnnexp.predict"


def main(argv: list[str] | None = None) -> int:
    cli = parser(PROG, __doc__)
    cli.add_argument("images", nargs="+", type=Path, metavar="IMAGES_OR_FOLDERS", help="image files and folders")
    cli.add_argument("--top-k", type=int, default=3, help="classes per image, most probable first (default 3)")
    cli.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV (default predictions.csv)")
    args = cli.parse_args(argv)

    def body() -> int:
        if args.top_k < 1:
            raise ConfigError(f"--top-k {args.top_k}: give at least 1.")
        files = image_files(args.images)  # checked before the run is loaded
        run = load(args, PROG)
        k = min(args.top_k, len(run.classes))
        start = time.perf_counter()
        rows = list(predict_files(run, files, k))
        write_csv(rows, args.out, k)
        failed = sum(1 for r in rows if r.get("error"))
        if sys.stdout.isatty():
            print(table(rows))
        print(f"Predicted {len(rows) - failed} images in {time.perf_counter() - start:.1f} s with "
              f"{run.weights.describe()}" + (f"; {failed} unreadable (their rows say why)" if failed else "")
              + f". Written to {args.out}")
        return 0

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
