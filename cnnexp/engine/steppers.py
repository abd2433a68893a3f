"""Training steps and epochs, as fast as eager PyTorch allows.

A batch-4 step of a 62k-parameter CNN is bound by per-operation overhead,
not arithmetic, so the engine removes operations rather than FLOPs:

* The optimiser is a flat-buffer SGD where it can be (optimizers.py).
* Batches are gathered from uint8 images already on the device and
  normalised inside the step (cnnexp/data).
* Each step's logits are recorded on the device with one copy; the host
  computes loss and accuracy from them once per epoch (and on CPU checks them
  every few hundred steps, to catch a NaN early).
* On CUDA the whole step (forward, backward, update, statistics) is captured
  once in a CUDA graph and replayed: one launch per step instead of ~60.
* On the CPU, a chain of Conv2d/ReLU/MaxPool2d(2)/flatten/Linear layers
  trained with SGD can run as one compiled C++ call per step (kernels/, a
  drop-in for the Stepper that the caller passes as `stepper_class`);
  autotune.py times it against the eager step and picks the faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnexp.engine.optimizers import FlatSGD
from cnnexp.engine.precision import LossScaler, StepOptions


# ----------------------------------------------------------------- one step
class Stepper:
    """Runs training steps and records each sample's logits on the device.

    Recording the logits is one copy per step; the epoch's loss and accuracy
    are computed from them once at the end (or at a progress report), not
    with four or five small operations every step."""

    def __init__(self, model: nn.Module, optimizer, rows: int, num_classes: int, batch_size: int,
                 device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 options: StepOptions | None = None):
        self.model, self.optimizer, self.batch_size = model, optimizer, batch_size
        self.prepare = prepare  # raw batch -> model input (normalisation); None: use as is
        self.options = options or StepOptions()  # precision, memory format, label smoothing
        self.scaler = LossScaler() if self.options.precision == "16-mixed" else None
        self.logits = torch.zeros(rows, num_classes, device=device)  # one row per sample of the epoch
        self.next_rows = torch.arange(batch_size, device=device)  # where a captured step writes next

    def begin(self, start_row: int = 0, prior_logits: torch.Tensor | None = None) -> None:
        """Start an epoch at `start_row`; a resumed epoch brings its earlier logits."""
        self.logits.zero_()
        if prior_logits is not None:
            self.logits[:start_row].copy_(prior_logits)
        self.next_rows.copy_(torch.arange(self.batch_size, device=self.next_rows.device) + start_row)

    def step(self, x: torch.Tensor, y: torch.Tensor, row: int | None = None) -> None:
        """One optimiser step. `row` is where its logits go; None (a captured
        step) writes at next_rows and advances it on the device."""
        self.optimizer.zero_grad()
        if self.options.is_plain:  # the original experiment's step, operation for operation
            out = self.model(self.prepare(x) if self.prepare is not None else x)
            F.cross_entropy(out, y).backward()
            self.optimizer.step()
        else:
            out = self._step_with_options(x, y)
        with torch.no_grad():
            if row is None:
                self.logits.index_copy_(0, self.next_rows, out.detach())
                self.next_rows += self.batch_size
            else:
                self.logits[row : row + out.shape[0]].copy_(out.detach())

    def _step_with_options(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opts = self.options
        x = opts.prepare_input(self.prepare(x) if self.prepare is not None else x)
        with opts.autocast(x.device.type):
            out = self.model(x)
        loss = opts.loss(out, y)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # float16: scaled loss; a step whose gradients overflowed is skipped
            self.scaler.backward(loss)
            if self.scaler.unscale([p for p in self.model.parameters() if p.requires_grad]):
                self.optimizer.step()
        return out

    def step_slice(self, x: torch.Tensor, y: torch.Tensor, lo: int, hi: int) -> None:
        """One step on samples lo:hi of the epoch's x and y (logits to rows lo:hi)."""
        self.step(x[lo:hi], y[lo:hi], row=lo)

    def state_tensors(self) -> list[torch.Tensor]:
        tensors = [self.logits, self.next_rows]
        tensors += [b for b in self.model.buffers()]
        tensors += self.optimizer.state_tensors()
        return tensors


class GraphedStep:
    """The Stepper's step captured in a CUDA graph over static input buffers."""

    def __init__(self, stepper: Stepper, x: torch.Tensor, y: torch.Tensor, warmup_steps: int = 3):
        self.stepper = stepper
        self.static_x, self.static_y = x.clone(), y.clone()
        # Warm-up runs real steps; roll the state back afterwards so the
        # captured run starts exactly where an eager run would.
        saved = [t.detach().clone() for t in stepper.state_tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                stepper.step(self.static_x, self.static_y)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            stepper.step(self.static_x, self.static_y)
        with torch.no_grad():
            for tensor, value in zip(stepper.state_tensors(), saved):
                tensor.copy_(value)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()


# ----------------------------------------------------------------- epochs
@dataclass
class EpochResult:
    steps: int  # steps completed in this epoch (all of them unless stopped); the sums cover them all
    loss_sum: float  # sum over steps of each batch's mean loss
    correct: int
    samples: int
    first_bad_step: int | None = None  # 0-based step whose output was not finite


class Engine:
    """Trains epochs over slices of tensors already on the device."""

    def __init__(self, model: nn.Module, optimizer, train_size: int, batch_size: int, device: torch.device, *,
                 num_classes: int, cuda_graph: bool = True, nan_check_every: int = 200,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 stepper_class: type[Stepper] | None = None, options: StepOptions | None = None):
        self.model, self.optimizer = model, optimizer
        self.batch_size, self.device = batch_size, device
        self.steps_per_epoch = -(-train_size // batch_size)  # the last partial batch is kept
        # The compiled step (kernels.CompiledStepper) has the Stepper's interface and recorded logits.
        stepper_class = stepper_class or Stepper
        if options is not None and not options.is_plain:
            self.stepper = stepper_class(model, optimizer, train_size, num_classes, batch_size, device, prepare,
                                         options=options)
        else:
            self.stepper = stepper_class(model, optimizer, train_size, num_classes, batch_size, device, prepare)
        # float16's loss scaler decides on the host whether to step: no graph capture then
        self.use_graph = (cuda_graph and device.type == "cuda" and isinstance(optimizer, FlatSGD)
                          and self.stepper.scaler is None)
        self.graphed: GraphedStep | None = None
        # On a GPU a NaN check is a host sync: check once per epoch there.
        self.nan_check_every = nan_check_every if device.type == "cpu" else 0
        self.labels: torch.Tensor | None = None  # this epoch's labels, in step order

    def train_epoch(self, x_all: torch.Tensor, y_all: torch.Tensor, perm: torch.Tensor, *, start_step: int = 0,
                    prior_logits: torch.Tensor | None = None,
                    should_stop: Callable[[], bool] = lambda: False,
                    on_progress: Callable[[int, Callable[[], float]], None] | None = None,
                    progress_every: int = 100, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    lr_at: Callable[[int], float] | None = None,
                    after_step: Callable[[], None] | None = None) -> EpochResult:
        """Steps from `start_step` through the permutation, or until should_stop()
        turns true (checked between steps). `augment` maps the epoch's gathered
        images to augmented ones; `lr_at(step)` sets the rate before each step;
        `after_step` runs after each (the weight average)."""
        self.model.train()
        n, bs = perm.numel(), self.batch_size
        perm = perm.to(self.device)
        # One gather per epoch; every batch is then a view, not a copy.
        x_epoch, self.labels = x_all.index_select(0, perm), y_all.index_select(0, perm)
        if augment is not None:
            x_epoch = augment(x_epoch)
        self.stepper.begin(start_step * bs, prior_logits)
        total_steps = -(-n // bs)
        if self.use_graph and self.graphed is None and n >= bs:
            self.graphed = GraphedStep(self.stepper, x_epoch[:bs], self.labels[:bs])
        step = start_step
        while step < total_steps:
            lo, hi = step * bs, min(step * bs + bs, n)
            if lr_at is not None:
                self.optimizer.set_lr(lr_at(step))
            if self.graphed is not None and hi - lo == bs:
                self.graphed.step(x_epoch[lo:hi], self.labels[lo:hi])
            else:
                self.stepper.step_slice(x_epoch, self.labels, lo, hi)
            if after_step is not None:
                after_step()
            step += 1
            if self.nan_check_every and step % self.nan_check_every == 0:
                bad = self._first_bad_step(step - self.nan_check_every, step)
                if bad is not None:
                    return self._result(step, n, bad)
            if on_progress is not None and step % progress_every == 0:
                on_progress(step, lambda s=step: float(self._batch_losses(max(start_step, s - progress_every), s).mean()))
            if should_stop():
                break
        return self._result(step, n, self._first_bad_step(start_step, step))

    def _rows(self, step: int) -> int:
        return min(step * self.batch_size, self.labels.numel())

    def _first_bad_step(self, first: int, upto: int) -> int | None:
        lo = self._rows(first)
        finite = torch.isfinite(self.stepper.logits[lo : self._rows(upto)]).all(1)
        if bool(finite.all()):
            return None
        return (lo + int((~finite).nonzero()[0, 0])) // self.batch_size

    def _batch_losses(self, first: int, upto: int) -> torch.Tensor:
        """Each step's mean loss (float64), from the recorded logits."""
        lo, hi = self._rows(first), self._rows(upto)
        if hi <= lo:
            return torch.full((1,), float("nan"), dtype=torch.float64)
        per_sample = F.cross_entropy(self.stepper.logits[lo:hi], self.labels[lo:hi], reduction="none").double()
        step_of = torch.arange(lo, hi, device=per_sample.device) // self.batch_size - first
        sums = torch.zeros(upto - first, dtype=torch.float64, device=per_sample.device).index_add_(0, step_of,
                                                                                                  per_sample)
        return sums / torch.bincount(step_of, minlength=upto - first)

    def _result(self, step: int, n: int, bad: int | None) -> EpochResult:
        rows = self._rows(step)
        correct = (self.stepper.logits[:rows].argmax(1) == self.labels[:rows]).sum()
        return EpochResult(steps=step, loss_sum=float(self._batch_losses(0, step).sum()), correct=int(correct),
                           samples=rows, first_bad_step=bad)

