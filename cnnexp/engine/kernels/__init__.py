"""The compiled CPU training step: forward, backward and SGD update of a small
CNN in one C++ call (fused_step.cpp), built on first use.

`unsupported_reason(model, batch)` says why a model cannot use it (None when
it can); `CompiledStepper` is a drop-in for the engine's Stepper. The eager
step stays the reference: the tests hold the two to the same weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnnexp.data import Normalizer
from cnnexp.engine.kernels import layers as chain_of
from cnnexp.engine.kernels.build import BuildError, load
from cnnexp.engine.optimizers import FlatSGD
from cnnexp.engine.steppers import Stepper

__all__ = ["CompiledStepper", "unsupported_reason"]


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
        self._direct_for = None  # (x, y) pointers step_slice has checked

    def _create(self, x: torch.Tensor) -> None:
        self.input_shape = tuple(x.shape[1:])
        chain_of.check_shapes(self.layers, self.input_shape, self.logits.shape[1])
        opt = self.optimizer
        self.spec = torch.tensor(chain_of.spec(self.layers, self.input_shape, self.batch_size, opt.params),
                                 dtype=torch.int32)
        momentum = opt.momentum_buffer.data_ptr() if opt.momentum_buffer is not None else None
        self.handle = self.lib.cnx_create(self.spec.data_ptr(), opt.params.data_ptr(), opt.grads.data_ptr(),
                                          momentum, opt.params.numel())
        if not self.handle:
            raise RuntimeError("the compiled step rejected the layer description")

    def step(self, x: torch.Tensor, y: torch.Tensor, row: int | None = None) -> None:
        if row is None:
            raise ValueError("the compiled step records logits at an explicit row")
        if self.handle is None or tuple(x.shape[1:]) != self.input_shape:
            self._close()
            self._create(x)
            self._direct_for = None
        n = x.shape[0]
        if n > self.batch_size:
            raise ValueError(f"a batch of {n} images exceeds the batch size {self.batch_size}")
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
        logits = self.logits[row : row + n]
        self.lib.cnx_step(self.handle, x.data_ptr(), is_uint8, shift, scale, y.data_ptr(), n, logits.data_ptr(),
                          opt.lr, opt.momentum, opt.weight_decay, int(bool(opt.nesterov)))

    def step_slice(self, x: torch.Tensor, y: torch.Tensor, lo: int, hi: int) -> None:
        """The epoch's step without slicing tensors: pointers into x, y and the
        logits are computed here, which saves a few microseconds a step."""
        key = (x.data_ptr(), y.data_ptr())
        if key != self._direct_for:
            direct = (x.dtype == torch.uint8 and x.is_contiguous() and isinstance(self.prepare, Normalizer)
                      and y.dtype == torch.int64 and y.is_contiguous() and self.handle is not None
                      and tuple(x.shape[1:]) == self.input_shape)
            if not direct:
                return self.step(x[lo:hi], y[lo:hi], row=lo)
            self._direct_for = key
            self._x_row = x[0].numel()
            self._norm = (self.prepare.shift.data_ptr(), self.prepare.scale.data_ptr())
        opt, k = self.optimizer, self.logits.shape[1]
        self.lib.cnx_step(self.handle, key[0] + lo * self._x_row, 1, self._norm[0], self._norm[1], key[1] + 8 * lo,
                          hi - lo, self.logits.data_ptr() + 4 * k * lo, opt.lr, opt.momentum, opt.weight_decay,
                          int(bool(opt.nesterov)))

    def _close(self) -> None:
        if self.handle is not None:
            self.lib.cnx_destroy(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self._close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
