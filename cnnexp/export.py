"""Export a trained run as TorchScript or ONNX, the normalisation inside:

    python -m cnnexp.export RUN_DIR --format onnx                 RUN_DIR/exported/model-best.onnx
    python -m cnnexp.export RUN_DIR --format torchscript --weights final --out model.pt

The exported model takes float32 images in [0, 1], N x C x H x W (any N), and
returns logits; class names are stored in it. Before the command returns it
runs the file on real test images and compares the logits with the PyTorch
model's. ONNX needs the onnx extra: pip install 'cnnexp[onnx]'.
More: docs/using-a-trained-model.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnnexp.use.commandline import load, parser, run_command
from cnnexp.use.export import check_format, export_run

PROG = "python -m cnnexp.export"


def main(argv: list[str] | None = None) -> int:
    cli = parser(PROG, __doc__)
    cli.add_argument("--format", required=True, metavar="torchscript|onnx", help="torchscript or onnx")
    cli.add_argument("--out", type=Path, help="the file to write (default: RUN_DIR/exported/model-<weights>.<ext>)")
    args = cli.parse_args(argv)

    def body() -> int:
        check_format(args.format)  # an unknown format or a missing extra, before the run is loaded
        run = load(args, PROG)
        done = export_run(run, args.format, args.out)
        print(f"Exported {run.weights.describe()} as {args.format} to {done.path}; checked on {done.checked_images} "
              f"test images: largest logit difference {done.largest_difference:.2e} (allowed {done.limit:.0e}).")
        return 0

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
