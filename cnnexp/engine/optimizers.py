"""Optimisers behind one small interface: set_lr, zero_grad, step, state_dict.

FlatSGD keeps every parameter and every gradient as a view into one flat
buffer, so zeroing the gradients and the whole SGD-with-momentum update are
three or four tensor operations instead of a few per parameter. Its math is
torch.optim.SGD's (dampening 0): buf = momentum*buf + g; p -= lr*buf. Any
other optimiser, or trainer.fast_path=false, runs through the torch.optim
class named by the config's `_target_` (TorchOptimizer).

With decay_norm_and_bias=False, weight decay skips every parameter of one
dimension or less (biases, batch-norm scales and shifts): decaying those
only fights the normalisation.

A model may tag a parameter with an `lr_scale` attribute (models.Fast94Net
does, on its batch-norm shifts): that parameter's learning rate is multiplied
by it and its weight decay divided by it, so the decay per step stays the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig

SGD_TARGETS = {"torch.optim.SGD", "torch.optim.sgd.SGD"}


class FlatSGD:
    """SGD with momentum over parameters that share one flat buffer.

    The learning rate is a Python float for eager steps and a device tensor
    for captured ones: a CUDA graph reads the tensor at replay, so a learning
    rate schedule still applies inside the graph."""

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, capturable: bool = False, decay_norm_and_bias: bool = True):
        params = [p for p in model.parameters() if p.requires_grad]
        device, dtype = params[0].device, params[0].dtype
        total = sum(p.numel() for p in params)
        self.params = torch.empty(total, device=device, dtype=dtype)
        self.grads = torch.zeros(total, device=device, dtype=dtype)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                view = _channels_last_view if _is_channels_last(p) else _plain_view
                view(self.params[offset : offset + n], p).copy_(p)
                p.data = view(self.params[offset : offset + n], p)
                # Autograd accumulates in place into an existing .grad, so the
                # views keep every gradient inside self.grads.
                p.grad = view(self.grads[offset : offset + n], p)
                offset += n
        # Per element: the weight decay factor (0 on skipped norms and biases, 1/lr_scale) and the
        # learning-rate factor; None where every element has 1.
        decay = [float(decay_norm_and_bias or not is_norm_or_bias(p)) / lr_scale(p) for p in params]
        scale = [lr_scale(p) for p in params]
        self.decay_mask = None if all(d == 1.0 for d in decay) else _per_element(params, decay)
        self.lr_scale = None if all(c == 1.0 for c in scale) else _per_element(params, scale)
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
        if self.weight_decay and self.decay_mask is not None:
            g = g.addcmul(self.params, self.decay_mask, value=self.weight_decay)
        elif self.weight_decay:
            g = g.add(self.params, alpha=self.weight_decay)
        if self.momentum_buffer is not None:
            # A zero buffer makes the first step buf = g, as torch.optim.SGD does.
            self.momentum_buffer.mul_(self.momentum).add_(g)
            g = g.add(self.momentum_buffer, alpha=self.momentum) if self.nesterov else self.momentum_buffer
        if self.lr_scale is not None:
            g = g * self.lr_scale
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


def lr_scale(p: torch.Tensor) -> float:
    return float(getattr(p, "lr_scale", 1.0))


def _per_element(params: list[torch.Tensor], factors: list[float]) -> torch.Tensor:
    p0 = params[0]
    return torch.cat([torch.full((p.numel(),), f, device=p0.device, dtype=p0.dtype) for p, f in zip(params, factors)])


def _is_channels_last(p: torch.Tensor) -> bool:
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)


def _plain_view(segment: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return segment.view(p.shape)


def _channels_last_view(segment: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The segment as a channels-last tensor of p's shape: a model moved to
    channels_last (trainer.channels_last) keeps its weights in that format,
    so oneDNN does not reorder them at every step."""
    o, i, h, w = p.shape
    return segment.view(o, h, w, i).permute(0, 3, 1, 2)


class TorchOptimizer:
    """A torch.optim optimiser behind FlatSGD's small interface."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.lr = self._base_lr()

    def _base_lr(self) -> float:
        group = self.optimizer.param_groups[0]
        return float(group["lr"]) / group.get("lr_scale", 1.0)

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"kind": "torch", "state": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["state"])
        self.lr = self._base_lr()


def is_norm_or_bias(p: torch.Tensor) -> bool:
    return p.dim() <= 1


def build_optimizer(optim_cfg: DictConfig, model: nn.Module, fast_path: bool, capturable: bool = False, *,
                    decay_norm_and_bias: bool = True):
    if fast_path and optim_cfg._target_ in SGD_TARGETS and FlatSGD.supports(model):
        # Keys SGD leaves at its defaults may be absent (e.g. optim=adam optim._target_=torch.optim.SGD).
        return FlatSGD(model, lr=optim_cfg.lr, momentum=optim_cfg.get("momentum", 0.0),
                       weight_decay=optim_cfg.get("weight_decay", 0.0), nesterov=optim_cfg.get("nesterov", False),
                       capturable=capturable, decay_norm_and_bias=decay_norm_and_bias)
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias and all(lr_scale(p) == 1.0 for p in params):
        return TorchOptimizer(instantiate(optim_cfg)(model.parameters()))
    # One group per (decayed, lr scale): torch.optim multiplies a group's lr and weight decay.
    groups: dict[tuple[bool, float], list] = {}
    for p in params:
        groups.setdefault((decay_norm_and_bias or not is_norm_or_bias(p), lr_scale(p)), []).append(p)
    weight_decay = float(optim_cfg.get("weight_decay", 0.0))
    return TorchOptimizer(instantiate(optim_cfg)(
        [{"params": ps, "lr": optim_cfg.lr * scale, "lr_scale": scale,
          "weight_decay": weight_decay / scale if decayed else 0.0}
         for (decayed, scale), ps in groups.items()]))
