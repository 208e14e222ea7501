"""The dry run's report: a :class:`~twinflow.train.preflight.PreflightPlan` as the text
``twinflow train --dry-run`` prints (batch and slices per phase, the model, memory per strategy)."""

from __future__ import annotations

from twinflow.objective.partition import SLICE_NAMES
from twinflow.train.preflight import GB, PreflightPlan


def render(plan: PreflightPlan) -> str:
    """The plan as the text ``twinflow train --dry-run`` prints."""
    lines = [
        f"dry run: {plan.world_size} process(es), strategy {plan.strategy}, precision {plan.precision} (nothing written)",
        f"batch: global {plan.batch_size} per micro-step = {plan.per_process_batch} per process; "
        f"{plan.grad_accumulation} micro-step(s) -> {plan.samples_per_step} samples per optimizer step",
    ]
    for s in plan.slices:
        ratio = ":".join(str(s.weights[name]) for name in SLICE_NAMES)
        window = "/".join(str(s.step_window[name]) for name in SLICE_NAMES)
        if s.whole_periods:
            steps = f"every optimizer step holds {plan.samples_per_step // s.period} whole period(s) ({window})"
        else:
            steps = f"the slices rotate over {s.rotation_steps} optimizer steps (first step {window})"
        micro = "/".join(str(s.micro_batch[name]) for name in SLICE_NAMES)
        hold = "every slice in proportion" if plan.per_process_batch % s.period == 0 else "part of the pattern, rotating"
        lines.append(
            f"phase {s.phase} ({s.preset}, {s.steps} steps): slices {'/'.join(SLICE_NAMES)} = {ratio} (period {s.period}); "
            f"{steps}; a micro-batch of {plan.per_process_batch} holds {hold} (rank 0 first: {micro})"
        )
    lines.append(f"model: {plan.model}" + (f" ({plan.family})" if plan.family else "") + ", built on the meta device")
    split = f" = {plan.transformer_parameters:,} + {plan.second_embedding_parameters:,} emb_2" if plan.second_embedding_parameters else ""
    lines.append(
        f"  parameters: {plan.base_parameters:,} in {plan.base_dtype}{split}; trained {plan.trained_parameters:,}; "
        f"teacher: {plan.teacher}"
    )
    if plan.lora_rank:
        targets = ", ".join(f"{target} x{count}" for target, count in plan.lora_targets.items())
        lines.append(f"  LoRA rank {plan.lora_rank}: {plan.lora_parameters:,} parameters per adapter (fp32); {targets}")
    units = ", ".join(f"{count} x {name}" for name, count in plan.fsdp_units.items()) or "none"
    lines.append(f"  FSDP units (repeated_blocks): {units}")
    if plan.activations:
        a = plan.activations
        size = "x".join(str(side) for side in a.latent_shape)
        tokens = f", {a.tokens} tokens" if a.tokens else ""
        lines.append(
            f"  activations (estimate): {size} from {a.source}{tokens}; {a.method}: "
            f"{a.per_sample / GB:.2f} GB per sample with gradient, {a.no_grad_per_sample / GB:.2f} GB without"
        )
    names = list(plan.memory)
    unit, scale = ("GB", GB) if max(m.total for m in plan.memory.values()) >= GB else ("MB", 1e6)
    header = "".join(f"{name + ('*' if name == plan.strategy else ''):>10}" for name in names)
    lines.append(f"{'memory per process, ' + unit + ' (* in effect):':<40}{header}")
    labels = {
        "weights": f"weights (base, {plan.base_dtype})", "buffers": "buffers", "adapters": "trained extras (fp32)",
        "gradients": "gradients", "optimizer": "optimizer (2 moments)",
        "teacher": f"teacher ({plan.teacher})", "gathered": "FSDP gathered weights",
        "activations": f"activations (estimate, batch {plan.per_process_batch})",
    }
    for key, label in labels.items():
        values = [f"{plan.memory[n].parts[key] / scale:.2f}" for n in names]
        if key == "activations" and plan.activations is None:
            label, values = "activations (not estimated)", ["-"] * len(names)
        lines.append(f"  {label:<38}" + "".join(f"{value:>10}" for value in values))
    lines.append(f"  {'total':<38}" + "".join(f"{plan.memory[n].total / scale:>10.2f}" for n in names))
    lines += [f"note: {note}" for note in plan.notes] + [f"warning: {caution}" for caution in plan.warnings]
    return "\n".join(lines)


__all__ = ["render"]
