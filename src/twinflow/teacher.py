"""The EMA teacher of the RCGM target (spec 2.7).

Decay 0 means "the model itself": no copy is made, which is what a 20B model needs. Otherwise
the teacher is a frozen copy updated after every optimizer step with a warm-up: the working
decay ``d`` starts at 0 and moves towards the configured decay by
``d += (1 - d) * (decay - d) * 0.5``, so early teachers follow the fast-changing model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher:
    """Exponential moving average of a model's weights, or the model itself when ``decay == 0``."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.working_decay = 0.0  # d in the spec's warm-up
        if decay == 0.0:
            self.network = model
        else:
            self.network = copy.deepcopy(model).requires_grad_(False).eval()

    @property
    def owns_weights(self) -> bool:
        """Whether the teacher holds weights of its own (a copy of the model), saved as
        ``ema.safetensors`` and sharded apart from the model's; False for the model itself."""
        return self.decay > 0.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model into the teacher with the current working decay, then advance it."""
        if self.owns_weights:
            decay = self.working_decay
            for teacher_parameter, parameter in zip(self.network.parameters(), model.parameters()):
                teacher_parameter.lerp_(parameter.detach(), 1.0 - decay)
            for teacher_buffer, buffer in zip(self.network.buffers(), model.buffers()):
                teacher_buffer.copy_(buffer)
        self.working_decay += (1.0 - self.working_decay) * (self.decay - self.working_decay) * 0.5

    def __call__(self, *args, **kwargs):
        return self.network(*args, **kwargs)

    def state_dict(self) -> dict:
        """Warm-up state; the weights are saved separately (safetensors) when ``owns_weights``."""
        return {"decay": self.decay, "working_decay": self.working_decay}

    def load_state_dict(self, state: dict) -> None:
        if float(state["decay"]) != self.decay:
            raise ValueError(f"checkpoint EMA decay {state['decay']} differs from the configured {self.decay}")
        self.working_decay = float(state["working_decay"])


__all__ = ["EMATeacher"]
