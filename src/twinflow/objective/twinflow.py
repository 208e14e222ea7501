"""The TwinFlow objective: ``L = L_base + L_adv + L_rectify`` (spec section 2).

One callable for every preset (``twinflow``, ``rcgm``, ``flow_matching``) and every backbone
that follows the contract ``model(x_t, t, r, cond)``. Network calls per step (2.6): one
forward with gradient on the whole batch; every other call runs under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twinflow.conditions import Condition, check_batch, select
from twinflow.objective.config import GUIDED_SLICES, ObjectiveConfig
from twinflow.objective.losses import per_sample_loss, time_weight
from twinflow.objective.partition import BatchPlan, plan_batch
from twinflow.objective.targets import (
    Network,
    guidance_enhanced_velocity,
    in_float32,
    long_jumps,
    one_step_samples,
    rcgm_target,
    velocity_difference,
)
from twinflow.path import LinearPath, Path
from twinflow.randomness import randn_like


@dataclass
class ObjectiveResult:
    """What one objective evaluation produced. Only ``loss`` carries gradient."""

    loss: Tensor  # the total to backpropagate
    base: Tensor  # L_base: weighted RCGM loss on the real slices
    adversarial: Tensor  # L_adv: flow matching on the fake flow at negative time
    rectify: Tensor  # L_rectify before its coefficient k
    network_calls: int  # forward passes (a batched call counts once), the gradient one included
    plan: BatchPlan

    def terms(self) -> dict[str, float]:
        """Named scalars for logging."""
        return {
            "loss": float(self.loss.detach()),
            "loss_base": float(self.base),
            "loss_adversarial": float(self.adversarial),
            "loss_rectify": float(self.rectify),
        }

    def term_samples(self) -> dict[str, int]:
        """How many samples each of :meth:`terms` averages over (0: the term is absent from this
        batch), so that logs can average a term over micro-batches that rotate the slices."""
        sizes = self.plan.sizes
        return {
            "loss": sum(sizes.values()),
            "loss_base": sizes["one_step"] + sizes["multi_step"] + sizes["any_step"],
            "loss_adversarial": sizes["fake"],
            "loss_rectify": sizes["one_step"] if float(self.rectify) != 0 else 0,
        }


class TwinFlowObjective:
    """``objective(model, data, cond, null_cond, teacher=..., generator=...) -> ObjectiveResult``.

    ``teacher`` defaults to the model itself (EMA decay 0). ``null_cond`` holds the "empty"
    conditions (null label, empty prompt) that the guidance-enhanced target needs.
    """

    def __init__(self, config: ObjectiveConfig, path: Path | None = None):
        self.config = config
        self.path = path if path is not None else LinearPath()

    def __call__(
        self,
        model: Network,
        data: Tensor,
        cond: Condition = None,
        null_cond: Condition = None,
        *,
        teacher: Network | None = None,
        generator: torch.Generator | None = None,
        stream_position: int = 0,
    ) -> ObjectiveResult:
        """``stream_position``: where this batch's first sample lies in the run's sample stream,
        which decides the slices the batch holds (spec 2.1; see :mod:`twinflow.objective.partition`).
        The default 0 gives a batch of whole periods every slice in proportion."""
        config, path = self.config, self.path
        teacher = model if teacher is None else teacher
        count = data.shape[0]
        check_batch(cond, count, "cond")
        check_batch(null_cond, count, "null_cond")
        if config.guidance_ratio > 0 and null_cond is None:
            raise ValueError("the guidance-enhanced target (objective.guidance_ratio > 0) needs null_cond")

        plan = plan_batch(count, config, generator, start=stream_position)
        time = plan.time.to(data)
        target_time = plan.target_time.to(data)
        real, fake = plan.real, plan.slice("fake")
        noise = randn_like(data, generator)
        calls = 0

        # Data: real images, or in image-free mode the model's own one-step samples; the fake
        # slice always gets the model's one-step samples from fresh noise (spec 2.4).
        data = data.clone()
        with torch.no_grad():
            replaced = slice(0, count) if config.image_free else fake
            if replaced.stop > replaced.start:
                fresh_noise = randn_like(data[replaced], generator)
                data[replaced] = one_step_samples(model, path, fresh_noise, select(cond, replaced))
                calls += 1

        x_t = path.interpolate(data, noise, time)
        velocity = path.velocity(data, noise, time)

        # Guidance-enhanced target (spec 2.2) on the real slices only.
        real_velocity, guidance_calls = guidance_enhanced_velocity(
            teacher, x_t[real], time[real], velocity[real], select(cond, real), select(null_cond, real),
            config.guidance_ratio, config.guidance_time_range, self._guided(plan, data.device),
        )
        calls += guidance_calls

        # The one forward pass with gradient.
        prediction = model(x_t, time, target_time, cond)
        calls += 1

        # L_base: RCGM target with the teacher, weighted by the jump length (2.3, 2.7).
        base_per_sample, base_calls = self._base_term(
            model, teacher, x_t[real], time[real], target_time[real], real_velocity, prediction[real],
            select(cond, real), data.device.type,
        )
        calls += base_calls

        # L_adv: plain flow matching towards z - x_fake at negative time (2.4).
        adversarial_per_sample = per_sample_loss(
            prediction[fake], velocity[fake], config.loss, config.barron_constant
        )

        # L_rectify: push the one-step output along -Delta_v (2.5).
        rectify_per_sample, rectify_calls = self._rectify_term(
            model, plan, x_t, time, prediction, cond, generator, data.new_zeros(0)
        )
        calls += rectify_calls

        # Every term is a sum over this batch's samples divided by the batch size; L_rectify's
        # mean over the one-step samples becomes a sum over them divided by their expected
        # number, so that a rotated small batch weighs it as a whole batch does (spec 2.1).
        total = (base_per_sample.sum() + adversarial_per_sample.sum()) / count
        if rectify_per_sample.numel():
            expected_one_step = count * plan.one_step_share
            total = total + config.rectify_coefficient * rectify_per_sample.sum() / expected_one_step
        return ObjectiveResult(
            loss=total,
            base=_mean_or_zero(base_per_sample),
            adversarial=_mean_or_zero(adversarial_per_sample),
            rectify=_mean_or_zero(rectify_per_sample),
            network_calls=calls,
            plan=plan,
        )

    def _guided(self, plan: BatchPlan, device: torch.device) -> Tensor | None:
        """Which real samples ``objective.guidance_slices`` admits to the guidance target, as a
        mask over the real slices; None when it admits all of them (the spec)."""
        chosen = self.config.guidance_slices
        if set(chosen) == set(GUIDED_SLICES):
            return None
        mask = torch.zeros(plan.real.stop, dtype=torch.bool)
        for name in chosen:
            mask[plan.slice(name)] = True
        return mask.to(device)

    def _base_term(
        self, model: Network, teacher: Network, x_t: Tensor, time: Tensor, target_time: Tensor,
        velocity: Tensor, prediction: Tensor, cond: Condition, device_type: str,
    ) -> tuple[Tensor, int]:
        """Per-sample L_base on the real slices and its network calls (spec 2.3, 2.7).

        The residual scales the prediction and the teacher's displacement by (t - r) / dt, up to
        100x: under bf16 autocast their rounding noise would then reach the clamp, so with
        float32 targets both are evaluated in float32 (one more call, without gradient).
        """
        config, path, calls = self.config, self.path, 0
        target_prediction, target_teacher = prediction, teacher
        if self._float32_targets(model, teacher, device_type):
            target_teacher = in_float32(teacher)
            long = long_jumps(time, target_time, config.small_step)
            if long.numel():
                target_prediction = target_prediction.detach().float().clone()
                with torch.no_grad():
                    target_prediction[long] = in_float32(model)(
                        x_t[long], time[long], target_time[long], select(cond, long)
                    )
                calls += 1
        target, teacher_calls = rcgm_target(
            target_teacher, path, x_t, time, target_time, velocity, target_prediction,
            cond, config.estimate_order, config.small_step, config.residual_clamp,
        )
        per_sample = per_sample_loss(prediction, target, config.loss, config.barron_constant)
        if config.time_weighting:
            per_sample = per_sample * time_weight(time, target_time)
        return per_sample, calls + teacher_calls

    def _rectify_term(
        self, model: Network, plan, x_t: Tensor, time: Tensor, prediction: Tensor, cond: Condition,
        generator: torch.Generator | None, empty: Tensor,
    ) -> tuple[Tensor, int]:
        """Per-sample L_rectify on the one-step slice and its network calls (spec 2.5), through
        the configured loss shape as the reference does. The target is formed in float32: in
        bfloat16, F - Delta_v would round away most of a small Delta_v."""
        config, path = self.config, self.path
        one_step = plan.slice("one_step")
        if config.rectify_coefficient <= 0 or one_step.stop <= one_step.start:
            return empty, 0
        one_step_prediction = prediction[one_step]
        samples = path.recover(x_t[one_step], one_step_prediction.detach(), time[one_step]).data
        delta, calls = velocity_difference(model, path, samples, select(cond, one_step), generator, config.residual_clamp)
        rectify_target = one_step_prediction.detach().float() - delta.float()
        shape = config.loss if config.rectify_loss is None else config.rectify_loss
        return per_sample_loss(one_step_prediction, rectify_target, shape, config.barron_constant), calls

    def _float32_targets(self, model: Network, teacher: Network, device_type: str) -> bool:
        """Whether the RCGM target's calls run in float32 (``objective.target_precision``): only
        under autocast and with an RCGM order > 0; ``auto`` when every weight is float32 (a
        bf16 base or FSDP's bf16 gathered weights cannot run a float32 call)."""
        choice = self.config.target_precision
        if choice == "compute" or self.config.estimate_order == 0 or not torch.is_autocast_enabled(device_type):
            return False
        weights = [parameter.dtype for network in (model, teacher) if isinstance(network, torch.nn.Module)
                   for parameter in network.parameters() if parameter.is_floating_point()]
        float32 = all(dtype == torch.float32 for dtype in weights)
        if choice == "float32" and not float32:
            raise ValueError(
                "objective.target_precision: float32 needs float32 weights, but the model computes with "
                f"{sorted({str(dtype) for dtype in weights} - {'torch.float32'})} ones (model.dtype: bf16, or FSDP "
                "with precision: bf16); use target_precision: compute or auto"
            )
        return float32


def _mean_or_zero(values: Tensor) -> Tensor:
    return values.detach().mean() if values.numel() else values.new_zeros(())
