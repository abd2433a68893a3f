"""TensorBoard: event files in <run dir>/tensorboard/<run label>/.

Per-epoch scalars with the epoch as the step (train/loss, test/acc, val/...,
lr, ...), the running training loss on the run-wide step axis, the run's name,
tags and the config as hparams (the HParams tab compares a sweep's jobs on their
last values), its notes as text, and the final figures as images.
`tensorboard --logdir multirun/<date>/<time>` shows a sweep's jobs side by side,
each named by its job number and swept values.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from cnnexp.results.record import read_record
from cnnexp.tracking.base import Tracker
from cnnexp.tracking.names import flat_config, numeric_columns

log = logging.getLogger("cnnexp")

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
        quiet_writer_thread_errors()
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=10)
        if not state.get("hparams"):
            self._write_hparams(cfg, read_record(run_dir) or {})
            state["hparams"] = True
        state["started"] = True
        self.writer.flush()

    def _write_hparams(self, cfg: DictConfig, record: dict) -> None:
        params = flat_config(cfg)
        params.pop("trainer.resume", None)
        # The run's name and tags as run.json has them (the name derived when none was given).
        identity = {"name": str(record.get("name") or self.label), "tags": ",".join(record.get("tags") or [])}
        # Those and the keys that name the run come first: the HParams tab shows the first few columns.
        named = [pair.partition("=")[0].lstrip("+~") for pair in self.label.split(",")]
        params = {**identity, **{k: params[k] for k in named if k in params},
                  **{k: v for k, v in params.items() if k not in identity}}
        if record.get("notes"):
            self.writer.add_text("notes", str(record["notes"]), 0)
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
        log.info("TensorBoard: event files in %s; open them with: tensorboard --logdir %s",
                 self.writer.log_dir, Path(self.writer.log_dir).parent)


def quiet_writer_thread_errors() -> None:
    """TensorBoard's writer thread re-raises a failed write (a log dir become
    read-only or full), which Python prints as a thread traceback. The same
    error reaches the tracker on its next call, which switches TensorBoard off
    with one warning, so the thread's copy is not printed."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another tensorboard layout: keep Python's default
        return
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, Exception)):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


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
