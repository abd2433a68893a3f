"""TensorBoard: event files in <run dir>/tensorboard/<run label>/.

Per-epoch scalars with the epoch as the step (train/loss, test/acc, val/...,
lr, ...), the running training loss on the run-wide step axis, the config as
hparams (the HParams tab compares a sweep's jobs on their last values), and the
final figures as images. `tensorboard --logdir multirun/<date>/<time>` shows a
sweep's jobs side by side, each named by its job number and swept values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from cnnexp.tracking.base import Tracker
from cnnexp.tracking.names import flat_config, numeric_columns

SPLITS = ("train", "val", "test")
# Shown in the HParams tab as each job's latest value.
HPARAM_METRICS = ("test/acc", "test/loss", "train/loss", "train/acc", "val/acc", "val/loss")


def scalar_tag(column: str) -> str:
    """metrics.csv column -> TensorBoard tag: train_loss -> train/loss; lr stays lr."""
    split, _, rest = column.partition("_")
    return f"{split}/{rest}" if split in SPLITS and rest else column


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, label: str, log_figures: bool = True):
        self.label, self.log_figures = label, log_figures
        self.writer: SummaryWriter | None = None
        self.last_epoch = 0

    def start(self, cfg: DictConfig, run_dir: Path, state: dict, steps_per_epoch: int | None,
              epochs_done: int) -> None:
        log_dir = Path(state.get("dir") or Path(run_dir).resolve() / "tensorboard" / self.label)
        state["dir"] = str(log_dir)
        self.last_epoch = epochs_done
        self.present = logged_epochs(log_dir) if state.get("started") else set()
        # A resumed run retrains from the checkpoint: drop the step points logged after it.
        purge = epochs_done * steps_per_epoch + 1 if state.get("started") and steps_per_epoch else None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=10)
        if not state.get("hparams"):
            self._write_hparams(cfg)
            state["hparams"] = True
        state["started"] = True
        self.writer.flush()

    def _write_hparams(self, cfg: DictConfig) -> None:
        params = flat_config(cfg)
        params.pop("trainer.resume", None)
        # The keys that name the run come first: the HParams tab shows the first few columns.
        named = [pair.partition("=")[0].lstrip("+~") for pair in self.label.split(",")]
        params = {**{k: params[k] for k in named if k in params}, **params}
        metrics = {tag: 0.0 for tag in HPARAM_METRICS}  # only the names are written here
        file_writer = self.writer._get_file_writer()
        for summary in hparams(params, metrics):
            file_writer.add_summary(summary)

    def log_step(self, global_step: int, running_loss: float) -> None:
        self.writer.add_scalar("train/running_loss", running_loss, global_step)

    def log_epoch(self, row: dict) -> None:
        if row["epoch"] in self.present:  # already in the event files (a resume after a hard kill)
            return
        for column, value in numeric_columns(row).items():
            self.writer.add_scalar(scalar_tag(column), value, row["epoch"])
        self.last_epoch = row["epoch"]
        self.writer.flush()  # so TensorBoard shows the epoch now, not up to flush_secs later

    def finish(self, status: str, run_dir: Path) -> None:
        try:
            if self.log_figures:
                from PIL import Image

                for png in sorted((run_dir / "plots").glob("*.png")):
                    with Image.open(png) as image:
                        pixels = np.asarray(image.convert("RGB"))
                    self.writer.add_image(f"plots/{png.stem}", pixels, self.last_epoch, dataformats="HWC")
            self.writer.add_text("status", status, self.last_epoch)
        finally:
            self.writer.close()


def logged_epochs(log_dir: Path) -> set[int]:
    """Epochs whose scalars the event files in log_dir already hold."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.is_dir():
        return set()
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "test/acc" not in events.Tags()["scalars"]:
        return set()
    return {e.step for e in events.Scalars("test/acc")}
