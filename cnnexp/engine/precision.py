"""How a training step computes: precision, memory format and loss (trainer.precision,
trainer.channels_last, trainer.label_smoothing).

`StepOptions()` is the original experiment's step: float32, the default
memory format, plain cross-entropy. bf16 runs the forward pass under
autocast (CPUs with AVX-512 BF16 or AMX, and GPUs); 16-mixed runs it in
float16 under autocast with a loss scaler, on CUDA only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PRECISIONS = ("32", "bf16", "16-mixed")


@dataclass(frozen=True)
class StepOptions:
    precision: str = "32"
    channels_last: bool = False
    label_smoothing: float = 0.0

    @property
    def is_plain(self) -> bool:
        """The original step: what the compiled C++ step also computes."""
        return self == StepOptions()

    def autocast(self, device_type: str):
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=device_type, dtype=dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.precision == "32" and not self.label_smoothing:
            return F.cross_entropy(out, y)  # exactly the original experiment's loss
        return F.cross_entropy(out.float(), y, label_smoothing=self.label_smoothing)

    def describe(self) -> str:
        parts = [] if self.precision == "32" else [self.precision]
        return ", ".join(parts + (["channels_last"] if self.channels_last else []))


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere it is emulated and slow."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def precision_problem(precision: str, device_type: str) -> str | None:
    """Why trainer.precision cannot run on this device (one line with what to use), or None."""
    if precision == "16-mixed" and device_type != "cuda":
        return ("trainer.precision=16-mixed needs a CUDA GPU (float16 on a CPU is slow and unscaled); "
                "use trainer.precision=bf16 on a CPU that supports it, or 32.")
    if precision == "bf16" and device_type == "cpu" and not cpu_supports_bf16():
        return ("trainer.precision=bf16 needs a CPU with AVX-512 BF16 or AMX, which this one lacks "
                "(it would be emulated and slower than float32); use trainer.precision=32.")
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return "trainer.precision=bf16 is not supported by this GPU; use trainer.precision=16-mixed or 32."
    return None


class LossScaler:
    """Dynamic loss scaling for float16 training on CUDA: gradients are computed
    of loss * scale, unscaled before the update; a step with inf/NaN gradients is
    skipped and the scale halved, and the scale doubles after `interval` good steps."""

    def __init__(self, scale: float = 2.0**16, interval: int = 2000):
        self.scale, self.interval, self.good_steps = scale, interval, 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale).backward()

    def unscale(self, params: list[torch.Tensor]) -> bool:
        """Divide the gradients by the scale; False when they hold inf or NaN (skip the step)."""
        grads = [p.grad for p in params if p.grad is not None]
        found = torch.zeros(1, device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.full_like(found, 1.0 / self.scale))
        if float(found):
            self.scale /= 2
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps % self.interval == 0:
            self.scale *= 2
        return True
