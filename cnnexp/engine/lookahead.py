"""Lookahead (trainer.lookahead_every, trainer.lookahead_decay), in the form
of the fast CIFAR-10 recipe (Jordan 2024).

A slow copy of the weights trails the training weights. Every `every` steps
it moves towards them, slow = d * slow + (1 - d) * weights, and the training
weights restart from it. The decay grows with the run's progress p (0 at the
start, 1 after the last step) as d = final_decay * p**3: early on the slow
copy simply follows the training weights; late in the run, where the
learning rate is small and the steps mostly noise, it averages them and
pulls them back. The run's last step is always an update, so the model
evaluated and saved at the end is the slow copy.
Parameters and floating-point buffers (batch-norm statistics) alike.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Lookahead:
    def __init__(self, model: nn.Module, every: int, final_decay: float, total_steps: int):
        self.every, self.final_decay, self.total_steps = int(every), float(final_decay), max(int(total_steps), 1)
        self.weights = [t for t in [*model.parameters(), *model.buffers()] if t.dtype.is_floating_point]
        self.slow = [w.detach().clone() for w in self.weights]
        self.steps = 0

    def decay(self) -> float:
        return self.final_decay * min(self.steps / self.total_steps, 1.0) ** 3

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        # The last step updates too, so a run whose length is not a multiple of
        # `every` keeps its last steps (and a run shorter than `every` trains at all).
        if self.steps % self.every == 0 or self.steps == self.total_steps:
            torch._foreach_lerp_(self.slow, [w.detach() for w in self.weights], 1.0 - self.decay())
            for w, s in zip(self.weights, self.slow):
                w.copy_(s)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "slow": [s.detach().cpu().clone() for s in self.slow]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        with torch.no_grad():
            for s, saved in zip(self.slow, state["slow"]):
                s.copy_(saved)
