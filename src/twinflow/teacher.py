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
    def is_copy(self) -> bool:
        return self.decay > 0.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model into the teacher with the current working decay, then advance it."""
        if self.is_copy:
            decay = self.working_decay
            for teacher_parameter, parameter in zip(self.network.parameters(), model.parameters()):
                teacher_parameter.lerp_(parameter.detach(), 1.0 - decay)
            for teacher_buffer, buffer in zip(self.network.buffers(), model.buffers()):
                teacher_buffer.copy_(buffer)
        self.working_decay += (1.0 - self.working_decay) * (self.decay - self.working_decay) * 0.5

    def __call__(self, *args, **kwargs):
        return self.network(*args, **kwargs)

    def state_dict(self) -> dict:
        """Warm-up state; the weights are saved separately (safetensors) when ``is_copy``."""
        return {"decay": self.decay, "working_decay": self.working_decay}

    def load_state_dict(self, state: dict) -> None:
        if float(state["decay"]) != self.decay:
            raise ValueError(f"checkpoint EMA decay {state['decay']} differs from the configured {self.decay}")
        self.working_decay = float(state["working_decay"])


class AdapterView(nn.Module):
    """The model with one of its LoRA adapters active for the duration of each call."""

    def __init__(self, model: nn.Module, adapter: str):
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        from twinflow.train.lora import active_adapter

        with active_adapter(self.model, self.adapter):
            return self.model(*args, **kwargs)


class AdapterEMATeacher(EMATeacher):
    """The EMA teacher of a LoRA model: the second PEFT adapter ``ema`` (made by
    :func:`twinflow.train.lora.apply_lora`) holds the EMA of the trained adapter ``default``.

    Same warm-up and interface as :class:`EMATeacher`; the teacher calls switch the active
    adapter, so the frozen base weights are shared. The EMA weights live in the model's own state
    dict (``...lora_A.ema.weight``), so checkpoints need no separate EMA file (``is_copy`` is false).
    A fully trained ``emb_2`` (``train_second_embedding``) is shared with the model, not averaged.

    :meth:`update` pairs the adapters' parameters of the model it is given, not those seen here:
    FSDP's ``fully_shard`` replaces every parameter by a sharded one after the teacher is made
    (:mod:`twinflow.train.distributed`), and each process then blends its own shards.
    """

    def __init__(self, model: nn.Module, decay: float):
        from twinflow.train.lora import EMA, adapter_pairs

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.working_decay = 0.0
        if decay > 0 and not adapter_pairs(model):
            raise ValueError("the model has no 'ema' LoRA adapter; build it with apply_lora(model, options, ema=True)")
        self.network = AdapterView(model, EMA) if decay > 0 else model

    @property
    def is_copy(self) -> bool:
        return False  # the EMA adapter is saved with the model's weights

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``default`` into ``ema`` (``model``: the unwrapped model, sharded or not)."""
        from twinflow.train.lora import adapter_pairs

        for teacher_parameter, parameter in adapter_pairs(model):
            teacher_parameter.lerp_(parameter.detach(), 1.0 - self.working_decay)
        self.working_decay += (1.0 - self.working_decay) * (self.decay - self.working_decay) * 0.5


def teacher_for(model: nn.Module, decay: float) -> EMATeacher:
    """The EMA teacher that suits ``model``: a LoRA adapter for a LoRA model, else a copy (or the model)."""
    from twinflow.train.lora import is_lora

    if is_lora(model):
        return AdapterEMATeacher(model, decay)
    return EMATeacher(model, decay)
