"""An exponential moving average of a model's weights (trainer.ema_decay).

After every step the average moves towards the weights: avg = decay * avg +
(1 - decay) * weights, for the parameters and the floating-point buffers
(batch-norm statistics) alike, so the averaged net's statistics fit its weights.
The decay ramps up over the first updates, min(decay, (1 + n) / (10 + n)) after
n updates, so that a short run's average is not held back by the initial weights. `swapped_in` puts the average into the model for an evaluation or a
save and the training weights back afterwards.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, float(decay)
        self.params = [t for t in [*model.parameters(), *model.buffers()] if t.dtype.is_floating_point]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the averaged weights inside the block."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "average": [a.detach().cpu().clone() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
        with torch.no_grad():
            for a, saved in zip(self.average, state["average"]):
                a.copy_(saved)
