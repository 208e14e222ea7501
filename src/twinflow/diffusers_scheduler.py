"""A diffusers-style scheduler for the unified sampler, for people who write their own loops.

    scheduler = TwinFlowScheduler(num_inference_steps=2, stochastic_ratio=1.0, gaps=(0.001, 0.6))
    scheduler.set_timesteps(2)
    for timestep, target in zip(scheduler.timesteps, scheduler.target_timesteps):
        velocity = transformer(latents, timestep / 1000, target / 1000, ...)   # F(x_t, t, r)
        latents = scheduler.step(velocity, timestep, latents, generator=generator).prev_sample

Timesteps follow diffusers' flow-matching convention: ``timestep = t * num_train_timesteps``
with ``t = 1`` pure noise (spec section 1). Unlike an ordinary scheduler, every step also has a
*target* timestep ``r * num_train_timesteps`` that the TwinFlow network takes as its second time
input (``r = 0`` for the ``few`` style, ``t_next`` for ``any``, ``t`` for ``mul``).

The step itself is :func:`twinflow.sampler.renoise`, the code :func:`twinflow.sampler.sample`
runs, so a loop over this scheduler gives exactly the sampler's result. First order only: the
Heun correction (``order=2``) needs a second network call per step; use ``twinflow.sample``.
Classifier-free guidance is the loop's business, as in diffusers pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from twinflow.path import Endpoints, LinearPath
from twinflow.sampler import SAMPLER_PRESETS, SamplerConfig, renoise, target_time, time_grid


@dataclass
class TwinFlowSchedulerOutput(BaseOutput):
    """``prev_sample``: ``x`` at the next time; ``pred_original_sample``: the data estimate ``x_hat``."""

    prev_sample: Tensor
    pred_original_sample: Tensor


class TwinFlowScheduler(SchedulerMixin, ConfigMixin):
    """The unified TwinFlow sampler (spec section 3) behind diffusers' scheduler API.

    Every constructor argument is a :class:`~twinflow.sampler.SamplerConfig` field (``steps`` is
    ``num_inference_steps``) and round-trips through ``save_pretrained`` / ``from_pretrained``.
    The defaults are the ``2nfe`` preset.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        num_inference_steps: int = 2,
        style: str = "few",
        stochastic_ratio: float | str = 1.0,  # rho in the paper
        extrapolation_ratio: float = 0.0,  # kappa in the paper
        time_warp: tuple[float, float, float] = (1.0, 1.0, 1.0),
        gaps: tuple[float, float] = (0.001, 0.6),
    ):
        self.path = LinearPath()
        self.sampler_config = SamplerConfig(
            steps=num_inference_steps, style=style, stochastic_ratio=stochastic_ratio,
            extrapolation_ratio=extrapolation_ratio, time_warp=tuple(time_warp), gaps=tuple(gaps),
        ).validate()
        self.set_timesteps(num_inference_steps)

    @classmethod
    def from_preset(cls, preset: str, num_train_timesteps: int = 1000) -> TwinFlowScheduler:
        """The scheduler of a sampler preset (``1nfe``, ``2nfe``, ``4nfe``, ``any``, ``multi``)."""
        if preset not in SAMPLER_PRESETS:
            raise ValueError(f"unknown sampler preset {preset!r}; choose one of {sorted(SAMPLER_PRESETS)}")
        config = SAMPLER_PRESETS[preset]
        if config.order != 1 or config.guidance_scale != 0.0:
            raise ValueError(f"preset {preset!r} uses order 2 or guidance, which this scheduler leaves to twinflow.sample")
        return cls(
            num_train_timesteps=num_train_timesteps, num_inference_steps=config.steps, style=config.style,
            stochastic_ratio=config.stochastic_ratio, extrapolation_ratio=config.extrapolation_ratio,
            time_warp=config.time_warp, gaps=config.gaps,
        )

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Build the grid for ``num_inference_steps`` network calls (default: the configured number).

        Sets ``sigmas`` (the times ``t``, ``n + 1`` values down to 0), ``timesteps`` and
        ``target_timesteps`` (``n`` values each, scaled by ``num_train_timesteps``).
        """
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        self.sampler_config = replace(self.sampler_config, steps=steps).validate()
        self.num_inference_steps = steps
        grid = time_grid(self.sampler_config)  # float64, decreasing to exactly 0
        pairs = list(zip(grid[:-1].tolist(), grid[1:].tolist()))
        targets = torch.tensor([target_time(self.sampler_config.style, now, after) for now, after in pairs], dtype=torch.float64)
        scale = self.config.num_train_timesteps
        self.sigmas = grid.to(device=device, dtype=torch.float32)
        self.timesteps = (grid[:-1] * scale).to(device=device, dtype=torch.float32)
        self.target_timesteps = (targets * scale).to(device=device, dtype=torch.float32)
        self._times = grid.tolist()  # float64 times, for the step arithmetic
        self._step_index = 0
        self._previous: Endpoints | None = None

    @property
    def step_index(self) -> int:
        return self._step_index

    def target_timestep(self, timestep: float | Tensor) -> float:
        """The target timestep ``r * num_train_timesteps`` that goes with ``timestep``."""
        return float(self.target_timesteps[self._index_of(timestep)])

    def _index_of(self, timestep: float | Tensor) -> int:
        value = float(timestep)
        distances = (self.timesteps.double().cpu() - value).abs()
        index = int(distances.argmin())
        if distances[index] > 1e-3 * self.config.num_train_timesteps:
            raise ValueError(f"timestep {value} is not one of this scheduler's timesteps {self.timesteps.tolist()}")
        return index

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor | None = None) -> Tensor:
        """Identity (flow models take ``x_t`` as it is); part of the diffusers scheduler API."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> TwinFlowSchedulerOutput | tuple[Tensor, Tensor]:
        """One sampler step from ``sample`` at ``timestep`` with the network's prediction ``F``.

        ``model_output`` must be ``F(x_t, t, r)`` with ``r`` = :meth:`target_timestep` / scale.
        Steps must come in order (the extrapolation remembers the previous step); calling
        :meth:`set_timesteps` starts over.
        """
        index = self._index_of(timestep)
        if index != self._step_index:
            raise ValueError(f"step for timestep {float(timestep)} (step {index}) called out of order; expected step {self._step_index}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}")
        t_cur, t_next = self._times[index], self._times[index + 1]
        work = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(work)
        ends = self.path.recover(x, model_output.to(work), t_cur)
        x_next = renoise(
            ends, self._previous, t_cur, t_next, self.sampler_config, self.path, generator, like=x, step_index=index
        )
        self._previous = ends
        self._step_index += 1
        output = (x_next.to(sample.dtype), ends.data.to(sample.dtype))
        return TwinFlowSchedulerOutput(*output) if return_dict else output

    def __len__(self) -> int:
        return self.config.num_train_timesteps
