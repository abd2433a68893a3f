"""The compiled CPU training step: forward, backward and SGD update of a small
CNN in one C++ call (fused_step.cpp), built on first use.

`unsupported_reason(model, batch)` says why a model cannot use it (None when
it can); `CompiledStepper` is a drop-in for the engine's Stepper. The eager
step stays the reference: the tests hold the two to the same weights.

What crosses into C++ is checked on this side (dtypes, shapes, the
optimiser's buffers) and again in the library (the layer chain, parameter
offsets, batch size, label range). Labels outside [0, classes) raise, as the
eager step does. When the library refuses to set up (buffers it cannot
allocate, a description it does not accept), the run steps eagerly from
then on, saying why once.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn as nn

from cnnexp.data import Normalizer
from cnnexp.engine.kernels import layers as chain_of
from cnnexp.engine.kernels.build import ERROR_BUFFER, BuildError, load
from cnnexp.engine.optimizers import FlatSGD
from cnnexp.engine.steppers import Stepper

__all__ = ["CompiledStepper", "unsupported_reason"]
log = logging.getLogger("cnnexp")


def unsupported_reason(model: nn.Module, batch: torch.Tensor, num_classes: int | None = None) -> str | None:
    """Why the compiled step cannot train `model` on batches like `batch`, or None."""
    params = [p for p in model.parameters()]
    if batch.device.type != "cpu" or any(p.device.type != "cpu" for p in params):
        return "it runs on the CPU only"
    if any(p.dtype != torch.float32 or not p.requires_grad for p in params) or not params:
        return "it trains float32 parameters that all require gradients"
    if batch.dim() != 4 or batch.dtype not in (torch.uint8, torch.float32):
        return "it takes a batch of uint8 or float32 images"
    try:
        layers = chain_of.chain(model)
        trained = sum(p.numel() for layer in layers if layer.module is not None
                      for p in layer.module.parameters())
        if trained != sum(p.numel() for p in params):
            return "the model has parameters outside its chain of layers"
        if num_classes is None:
            with torch.no_grad():
                num_classes = model(batch[:1].float()).shape[1]
        chain_of.check_shapes(layers, tuple(batch.shape[1:]), num_classes)
        load()
    except (chain_of.Unsupported, BuildError) as err:
        return str(err)
    return None


class CompiledStepper(Stepper):
    """The Stepper's step as one call into the compiled library: the same
    flat parameters, gradients and momentum buffer, the same recorded logits."""

    def __init__(self, model: nn.Module, optimizer, rows: int, num_classes: int, batch_size: int,
                 device: torch.device, prepare=None):
        super().__init__(model, optimizer, rows, num_classes, batch_size, device, prepare)
        if not isinstance(optimizer, FlatSGD):
            raise TypeError("the compiled step needs the flat SGD optimiser")
        self.layers = chain_of.chain(model)
        self.lib = load()
        self.handle = None
        self.input_shape = None
        self.eager_because = None  # why the library refused to set up: the eager step runs instead
        self._direct_for = None  # (x, y) pointers step_slice has checked
        _check_buffers(optimizer)

    def _create(self, x: torch.Tensor) -> None:
        self.input_shape = tuple(x.shape[1:])
        chain_of.check_shapes(self.layers, self.input_shape, self.logits.shape[1])
        opt = self.optimizer
        # Buffers for no more images than a step can get: an epoch's rows may be fewer than the batch size.
        self.max_images = max(1, min(self.batch_size, self.logits.shape[0]))
        self.spec = torch.tensor(chain_of.spec(self.layers, self.input_shape, self.max_images, opt.params),
                                 dtype=torch.int32)
        momentum = opt.momentum_buffer.data_ptr() if opt.momentum_buffer is not None else None
        reason = ctypes.create_string_buffer(ERROR_BUFFER)
        self.handle = self.lib.cnx_create(self.spec.data_ptr(), self.spec.numel(), opt.params.data_ptr(),
                                          opt.grads.data_ptr(), momentum, opt.params.numel(), reason, ERROR_BUFFER)
        if not self.handle:
            self.eager_because = reason.value.decode(errors="replace") or "the library refused the model"
            log.warning("The compiled CPU step is not used: %s; this run steps eagerly.", self.eager_because)

    def step(self, x: torch.Tensor, y: torch.Tensor, row: int | None = None) -> None:
        if row is None:
            raise ValueError("the compiled step records logits at an explicit row")
        if self.eager_because is not None:
            return super().step(x, y, row)
        if x.dim() != 4 or x.dtype not in (torch.uint8, torch.float32, torch.float64):
            raise TypeError(f"the compiled step takes (N, C, H, W) uint8 or float images, not {x.dtype} "
                            f"of shape {tuple(x.shape)}")
        if self.handle is None or tuple(x.shape[1:]) != self.input_shape:
            self._close()
            self._create(x)
            self._direct_for = None
            if self.handle is None:
                return super().step(x, y, row)
        n = x.shape[0]
        if n > self.max_images or n < 1:
            raise ValueError(f"a batch of {n} images; the compiled step takes 1 to {self.max_images}")
        _check_labels(y, n)
        normalizer = self.prepare if isinstance(self.prepare, Normalizer) else None
        if x.dtype == torch.uint8 and (normalizer is not None or self.prepare is None):
            if normalizer is None:  # raw uint8 without a normaliser: feed it as floats
                x, is_uint8, shift, scale = x.float().contiguous(), 0, None, None
            else:
                x, is_uint8 = x.contiguous(), 1
                shift, scale = normalizer.shift.data_ptr(), normalizer.scale.data_ptr()
        else:
            x = (self.prepare(x) if self.prepare is not None else x).float().contiguous()
            is_uint8, shift, scale = 0, None, None
        y = y.contiguous()
        opt = self.optimizer
        if row < 0 or row + n > self.logits.shape[0]:
            raise ValueError(f"logits rows {row}..{row + n} outside the epoch's {self.logits.shape[0]}")
        logits = self.logits[row : row + n]
        status = self.lib.cnx_step(self.handle, x.data_ptr(), is_uint8, shift, scale, y.data_ptr(), n,
                                   logits.data_ptr(), opt.lr, opt.momentum, opt.weight_decay, int(bool(opt.nesterov)))
        if status:
            self._refused(status, y)

    def _step_slice(self, x: torch.Tensor, y: torch.Tensor, lo: int, hi: int) -> None:
        """The epoch's step without slicing tensors: pointers into x, y and the
        logits are computed here, which saves a few microseconds a step."""
        key = (x.data_ptr(), y.data_ptr())
        if key != self._direct_for:
            direct = (x.dtype == torch.uint8 and x.is_contiguous() and isinstance(self.prepare, Normalizer)
                      and y.dtype == torch.int64 and y.is_contiguous() and self.handle is not None
                      and tuple(x.shape[1:]) == self.input_shape and y.dim() == 1
                      and y.shape[0] == x.shape[0] <= self.logits.shape[0])
            if not direct:
                return self.step(x[lo:hi], y[lo:hi], row=lo)
            self._direct_for = key
            self._x_row = x[0].numel()
            self._rows = x.shape[0]
            self._norm = (self.prepare.shift.data_ptr(), self.prepare.scale.data_ptr())
        if not 0 <= lo < hi <= self._rows:
            raise ValueError(f"samples {lo}:{hi} outside the epoch's {self._rows}")
        opt, k = self.optimizer, self.logits.shape[1]
        status = self.lib.cnx_step(self.handle, key[0] + lo * self._x_row, 1, self._norm[0], self._norm[1],
                                   key[1] + 8 * lo, hi - lo, self.logits.data_ptr() + 4 * k * lo, opt.lr,
                                   opt.momentum, opt.weight_decay, int(bool(opt.nesterov)))
        if status:
            self._refused(status, y[lo:hi])

    def _refused(self, status: int, y: torch.Tensor) -> None:
        """The library's refusal of a step (it changed nothing) as the exception eager would raise."""
        if status > 0:
            raise IndexError(f"label {int(y[status - 1])} of sample {status - 1} in the batch is outside "
                             f"[0, {self.logits.shape[1]}) (the model has {self.logits.shape[1]} classes)")
        raise ValueError(f"the compiled step refused a batch of {y.shape[0]} images (it takes 1 to "
                         f"{self.max_images})")

    def step_slice(self, x: torch.Tensor, y: torch.Tensor, lo: int, hi: int) -> None:
        if self.eager_because is not None:
            return super().step_slice(x, y, lo, hi)
        return self._step_slice(x, y, lo, hi)

    def _close(self) -> None:
        if self.handle is not None:
            self.lib.cnx_destroy(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self._close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _check_buffers(optimizer: FlatSGD) -> None:
    """The flat buffers the library writes through raw pointers: float32, contiguous, one size."""
    params = optimizer.params
    buffers = [("parameters", params), ("gradients", optimizer.grads)]
    if optimizer.momentum_buffer is not None:
        buffers.append(("momentum", optimizer.momentum_buffer))
    for name, t in buffers:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" or t.numel() != params.numel():
            raise TypeError(f"the compiled step needs the optimiser's {name} as one contiguous float32 CPU buffer "
                            f"of {params.numel()} values")


def _check_labels(y: torch.Tensor, n: int) -> None:
    # int32 labels read as int64 would be read out of bounds; eager's loss refuses them too
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != n:
        raise TypeError(f"the compiled step takes {n} int64 labels, not {y.dtype} of shape {tuple(y.shape)}")
