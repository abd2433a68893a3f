"""The training engine: one optimiser step per batch, as fast as eager PyTorch allows.

A batch-4 step of a 62k-parameter CNN is bound by per-operation overhead,
not arithmetic, so the engine removes operations rather than FLOPs:

* FlatSGD keeps every parameter and every gradient as a view into one flat
  buffer, so zeroing the gradients and the whole SGD-with-momentum update are
  three or four tensor operations instead of a few per parameter. Its math is
  torch.optim.SGD's (dampening 0): buf = momentum*buf + g; p -= lr*buf.
* Batches are gathered from uint8 images already on the device and
  normalised inside the step (see cnnexp/data.py).
* Each step's logits are recorded on the device with one copy; the host
  computes loss and accuracy from them once per epoch (and on CPU checks them
  every few hundred steps, to catch a NaN early).
* On CUDA the whole step (forward, backward, update, statistics) is captured
  once in a CUDA graph and replayed: one launch per step instead of ~60.

* On the CPU, a chain of Conv2d/ReLU/MaxPool2d(2)/flatten/Linear layers
  trained with SGD can run as one compiled C++ call per step
  (cnnexp/kernels, a drop-in for the Stepper); cnnexp/autotune.py times it
  against the eager step and picks the faster on each machine.

Any optimiser other than SGD, or trainer.fast_path=false, runs through the
torch.optim class named by the config's `_target_`, eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

SGD_TARGETS = {"torch.optim.SGD", "torch.optim.sgd.SGD"}


# ----------------------------------------------------------------- optimiser
class FlatSGD:
    """SGD with momentum over parameters that share one flat buffer.

    The learning rate is a Python float for eager steps and a device tensor
    for captured ones: a CUDA graph reads the tensor at replay, so a learning
    rate schedule still applies inside the graph."""

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, capturable: bool = False):
        params = [p for p in model.parameters() if p.requires_grad]
        device, dtype = params[0].device, params[0].dtype
        total = sum(p.numel() for p in params)
        self.params = torch.empty(total, device=device, dtype=dtype)
        self.grads = torch.zeros(total, device=device, dtype=dtype)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.params[offset : offset + n].copy_(p.reshape(-1))
                p.data = self.params[offset : offset + n].view_as(p)
                # Autograd accumulates in place into an existing .grad, so the
                # views keep every gradient inside self.grads.
                p.grad = self.grads[offset : offset + n].view_as(p)
                offset += n
        self.momentum_buffer = torch.zeros_like(self.params) if momentum else None
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.capturable = capturable
        self.lr = float(lr)
        self.lr_tensor = torch.tensor(self.lr, device=device, dtype=dtype)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        params = [p for p in model.parameters() if p.requires_grad]
        return bool(params) and len({(p.device, p.dtype) for p in params}) == 1

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)
        self.lr_tensor.fill_(self.lr)

    def zero_grad(self) -> None:
        self.grads.zero_()

    @torch.no_grad()
    def step(self) -> None:
        g = self.grads
        if self.weight_decay:
            g = g.add(self.params, alpha=self.weight_decay)
        if self.momentum_buffer is not None:
            # A zero buffer makes the first step buf = g, as torch.optim.SGD does.
            self.momentum_buffer.mul_(self.momentum).add_(g)
            g = g.add(self.momentum_buffer, alpha=self.momentum) if self.nesterov else self.momentum_buffer
        if self.capturable:
            self.params.addcmul_(g, self.lr_tensor, value=-1.0)
        else:
            self.params.add_(g, alpha=-self.lr)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step mutates (for CUDA-graph warm-up rollback)."""
        return [self.params] + ([self.momentum_buffer] if self.momentum_buffer is not None else [])

    def state_dict(self) -> dict:
        return {"kind": "FlatSGD", "lr": self.lr,
                "momentum_buffer": None if self.momentum_buffer is None else self.momentum_buffer.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.set_lr(state["lr"])
        if self.momentum_buffer is not None and state["momentum_buffer"] is not None:
            self.momentum_buffer.copy_(state["momentum_buffer"])


class TorchOptimizer:
    """A torch.optim optimiser behind FlatSGD's small interface."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.lr = float(optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"kind": "torch", "state": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["state"])
        self.lr = float(self.optimizer.param_groups[0]["lr"])


def build_optimizer(optim_cfg: DictConfig, model: nn.Module, fast_path: bool, capturable: bool = False):
    if fast_path and optim_cfg._target_ in SGD_TARGETS and FlatSGD.supports(model):
        # Keys SGD leaves at its defaults may be absent (e.g. optim=adam optim._target_=torch.optim.SGD).
        return FlatSGD(model, lr=optim_cfg.lr, momentum=optim_cfg.get("momentum", 0.0),
                       weight_decay=optim_cfg.get("weight_decay", 0.0), nesterov=optim_cfg.get("nesterov", False),
                       capturable=capturable)
    return TorchOptimizer(instantiate(optim_cfg)(model.parameters()))


# ----------------------------------------------------------------- one step
class Stepper:
    """Runs training steps and records each sample's logits on the device.

    Recording the logits is one copy per step; the epoch's loss and accuracy
    are computed from them once at the end (or at a progress report), not
    with four or five small operations every step."""

    def __init__(self, model: nn.Module, optimizer, rows: int, num_classes: int, batch_size: int,
                 device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.optimizer, self.batch_size = model, optimizer, batch_size
        self.prepare = prepare  # raw batch -> model input (normalisation); None: use as is
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
        out = self.model(self.prepare(x) if self.prepare is not None else x)
        F.cross_entropy(out, y).backward()
        self.optimizer.step()
        with torch.no_grad():
            if row is None:
                self.logits.index_copy_(0, self.next_rows, out.detach())
                self.next_rows += self.batch_size
            else:
                self.logits[row : row + out.shape[0]].copy_(out.detach())

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

    def __init__(self, model: nn.Module, optimizer, train_size: int, batch_size: int, device: torch.device,
                 num_classes: int, cuda_graph: bool = True, nan_check_every: int = 200,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, compiled: bool = False):
        self.model, self.optimizer = model, optimizer
        self.batch_size, self.device = batch_size, device
        self.steps_per_epoch = -(-train_size // batch_size)  # the last partial batch is kept
        stepper_class = Stepper
        if compiled:  # the fused C++ step (cnnexp/kernels); same interface, same recorded logits
            from cnnexp.kernels import CompiledStepper as stepper_class
        self.stepper = stepper_class(model, optimizer, train_size, num_classes, batch_size, device, prepare)
        self.use_graph = cuda_graph and device.type == "cuda" and isinstance(optimizer, FlatSGD)
        self.graphed: GraphedStep | None = None
        # On a GPU a NaN check is a host sync: check once per epoch there.
        self.nan_check_every = nan_check_every if device.type == "cpu" else 0
        self.labels: torch.Tensor | None = None  # this epoch's labels, in step order

    def train_epoch(self, x_all: torch.Tensor, y_all: torch.Tensor, perm: torch.Tensor, start_step: int = 0,
                    prior_logits: torch.Tensor | None = None,
                    should_stop: Callable[[], bool] = lambda: False,
                    on_progress: Callable[[int, Callable[[], float]], None] | None = None,
                    progress_every: int = 100) -> EpochResult:
        """Steps from `start_step` through the permutation, or until should_stop()
        turns true (checked between steps)."""
        self.model.train()
        n, bs = perm.numel(), self.batch_size
        perm = perm.to(self.device)
        # One gather per epoch; every batch is then a view, not a copy.
        x_epoch, self.labels = x_all.index_select(0, perm), y_all.index_select(0, perm)
        self.stepper.begin(start_step * bs, prior_logits)
        total_steps = -(-n // bs)
        if self.use_graph and self.graphed is None and n >= bs:
            self.graphed = GraphedStep(self.stepper, x_epoch[:bs], self.labels[:bs])
        step = start_step
        while step < total_steps:
            lo, hi = step * bs, min(step * bs + bs, n)
            if self.graphed is not None and hi - lo == bs:
                self.graphed.step(x_epoch[lo:hi], self.labels[lo:hi])
            else:
                self.stepper.step_slice(x_epoch, self.labels, lo, hi)
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


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: torch.Tensor  # [true, predicted] counts, on the CPU


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, num_classes: int,
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalResult:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], batch_size):
        batch = x[i : i + batch_size]
        out = model(prepare(batch) if prepare is not None else batch)
        target = y[i : i + batch_size]
        loss_sum += F.cross_entropy(out, target, reduction="sum")
        confusion += torch.bincount(target * num_classes + out.argmax(1), minlength=num_classes**2)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = x.shape[0]
    return EvalResult(loss=float(loss_sum) / n, accuracy=float(confusion.trace()) / n, confusion=confusion)


@contextlib.contextmanager
def cpu_settings(threads: int | None, onednn: bool | None = None):
    """Temporarily set torch's CPU thread count and oneDNN use."""
    old_threads, old_onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    if threads:
        torch.set_num_threads(threads)
    if onednn is not None:
        torch.backends.mkldnn.enabled = onednn
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.mkldnn.enabled = old_onednn
