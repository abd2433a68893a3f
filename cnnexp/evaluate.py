"""Evaluate a trained run:

    python -m cnnexp.evaluate RUN_DIR                       the run's test split, best weights
    python -m cnnexp.evaluate RUN_DIR --weights final       the last epoch's weights
    python -m cnnexp.evaluate RUN_DIR data=imagefolder data.root=~/new_photos   other images
    python -m cnnexp.evaluate SWEEP_DIR --best              the job the sweep's ranking selected

On the run's own split with the same weights the accuracy is run.json's, exactly.
Writes RUN_DIR/evaluations/<name>/: eval.json, per_class.csv, confusion.csv and
confusion_matrix.png. More: docs/using-a-trained-model.md.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from cnnexp.use.commandline import load, parser, run_command
from cnnexp.use.evaluation import SPLITS, TTA_CHOICES, Overrides, evaluate_run, parse_overrides

PROG = "python -m cnnexp.evaluate"


def main(argv: list[str] | None = None) -> int:
    cli = parser(PROG, __doc__)
    cli.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="data.* overrides: other data with the run's preprocessing (data=imagefolder "
                          "data.root=PATH); trainer.eval_batch_size, trainer.num_threads")
    cli.add_argument("--tta", choices=TTA_CHOICES,
                     help="test-time augmentation: flip averages the logits of each image and its mirror image, "
                          "flip_translate adds both shifted by a pixel each way (default: the run's trainer.tta)")
    cli.add_argument("--split", default="test", choices=SPLITS, help="the run's own split to evaluate on")
    cli.add_argument("--name", help="the folder under RUN_DIR/evaluations/ (default: from the data and weights)")
    args = cli.parse_intermixed_args(argv)  # overrides before or after the options

    def body() -> int:
        overrides = parse_overrides(args.overrides)  # refused before the run is loaded
        run = load(args, PROG)
        evaluation = evaluate_run(run, overrides, compose_data(overrides), split=args.split, tta=args.tta,
                                  name=args.name)
        print(evaluation.line())
        check = evaluation.record.get("reproduces")
        if check and not check["exact"]:
            print(f"{PROG}: note: the run's own figure was not reproduced; a different device, CPU, thread count "
                  "or torch version changes the last bits of the logits, and near-ties may flip.", file=sys.stderr)
        return 0

    return run_command(PROG, body)


def compose_data(overrides: Overrides) -> DictConfig | None:
    """The data node of a `data=<option>` override as Hydra composes it (the
    option's YAML values over its schema), or None without one."""
    if overrides.group is None:
        return None
    from hydra import compose, initialize_config_dir

    from cnnexp.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=[f"data={overrides.group}"]).data


if __name__ == "__main__":
    sys.exit(main())
