"""How much bf16 autocast perturbs the objective's targets, measured on a small diffusers transformer.

The RCGM residual (spec 2.3) ``R = ((t - r) F_theta - D) / dt - v`` scales the prediction and the
teacher's displacement by up to ``1 / dt = 100``, so the rounding noise of bf16 network outputs
is amplified there before the clamp at 1. ``Delta_v = F(x_t, -t, -t) - F(x_t, t, t)`` (spec 2.5) is
a plain difference of two outputs. This script runs the real objective three times on the same
batch, with the same random draws: in float32 (the truth), under bf16 autocast with the targets
in the autocast precision (``objective.target_precision: compute``, as the reference trains), and
under bf16 autocast with float32 targets (``float32``, this project's default where the weights
allow it). It records ``R`` where the objective forms it (a clamp too wide to act) and reports
``|R_bf16 - R_fp32|`` by jump length, and ``|Delta_v_bf16 - Delta_v_fp32|``.

    python benchmarks/bf16_targets.py --out benchmarks/results      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from twinflow.objective import TwinFlowObjective, objective_config
from twinflow.objective.targets import rcgm_target, velocity_difference
from twinflow.path import LinearPath

JUMP_BINS = ((0.0, 0.1), (0.1, 0.5), (0.5, 1.01))
MODES = ("fp32", "bf16 compute targets", "bf16 float32 targets")


class RecordedResidual:
    """Stands in for the objective's ``rcgm_target`` and keeps ``R = prediction - target`` of its
    call (with a clamp too wide to act, the target is ``prediction - R``), in float32: reading
    ``R`` off a bf16 gradient instead would add the gradient's own rounding."""

    def __init__(self):
        self.residual: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        target, calls = rcgm_target(*args, **kwargs)
        prediction = args[6] if len(args) > 6 else kwargs["prediction"]
        self.residual = prediction.detach().float() - target.float()
        return target, calls


def tiny_z_image(width: int, layers: int, seed: int = 0) -> nn.Module:
    """A random Z-Image transformer behind its adapter (float32 weights), ``width`` wide."""
    import diffusers

    from twinflow.adapters import build_adapter

    torch.manual_seed(seed)
    heads = max(2, width // 64)
    transformer = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=width, n_layers=layers, n_refiner_layers=1,
        n_heads=heads, n_kv_heads=heads, cap_feat_dim=64, axes_dims=[width // heads // 2, width // heads // 4, width // heads // 4],
        axes_lens=[64, 32, 32],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copy-initialised emb_2
        adapter = build_adapter("z_image", transformer)
    with torch.no_grad():  # a second embedding that differs from the first, as after training
        for parameter in adapter.second_embedding.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return adapter.eval()


def residuals(network: nn.Module, data, condition, null, mode: str, seed: int) -> tuple[torch.Tensor, object]:
    """``R`` of the batch's real samples under ``mode``, and the batch plan."""
    import twinflow.objective.twinflow as objective_module

    target_precision = "float32" if mode == "bf16 float32 targets" else "compute"
    config = objective_config("twinflow", residual_clamp=1e6, rectify_coefficient=0.0, target_precision=target_precision)
    recorder = RecordedResidual()
    original, objective_module.rcgm_target = objective_module.rcgm_target, recorder
    try:
        objective = TwinFlowObjective(config, LinearPath())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            result = objective(network, data, condition, null, generator=torch.Generator().manual_seed(seed))
    finally:
        objective_module.rcgm_target = original
    return recorder.residual, result.plan


def measure(width: int = 256, layers: int = 4, batch: int = 32, size: int = 16, seed: int = 1) -> dict:
    """The table of the module notes, as a dict (see :func:`markdown`)."""
    network = tiny_z_image(width, layers)
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, 16, size, size, generator=generator) * 0.7
    condition = {"prompt_embeds": torch.randn(batch, 6, 64, generator=generator)}
    null = {"prompt_embeds": torch.zeros(batch, 6, 64)}

    results = {mode: residuals(network, data, condition, null, mode, seed) for mode in MODES}
    truth, plan = results["fp32"]
    jump = (plan.time - plan.target_time)[plan.real]
    report = {"width": width, "layers": layers, "batch": batch, "latent": [16, size, size],
              "residual_rms_fp32": float(truth.square().mean().sqrt()), "residual_error": {}}
    for mode in MODES[1:]:
        error = results[mode][0] - truth
        bins = {}
        for low, high in JUMP_BINS:
            chosen = (jump >= low) & (jump < high)
            if chosen.any():
                bins[f"{low}-{min(high, 1.0)}"] = {
                    "rms": float(error[chosen].square().mean().sqrt()), "max": float(error[chosen].abs().max()),
                    "samples": int(chosen.sum()),
                }
        report["residual_error"][mode] = {
            "rms": float(error.square().mean().sqrt()), "max": float(error.abs().max()), "by_jump": bins,
        }

    samples = data[:8]
    differences = {}
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            difference, _ = velocity_difference(
                network, LinearPath(), samples, {"prompt_embeds": condition["prompt_embeds"][:8]},
                torch.Generator().manual_seed(seed + 1), clamp=1e6,
            )
        differences[autocast] = difference.float()
    error = differences[True] - differences[False]
    report["delta_v"] = {
        "rms_fp32": float(differences[False].square().mean().sqrt()),
        "error_rms": float(error.square().mean().sqrt()), "error_max": float(error.abs().max()),
    }
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Random Z-Image transformer, width {report['width']}, {report['layers']} layers, batch {report['batch']} "
        f"of {'x'.join(map(str, report['latent']))} latents, CPU bf16 autocast against float32. "
        f"RMS of R in float32: {report['residual_rms_fp32']:.2f} (a random model: far from consistent).",
        "",
        "| targets | jump t - r | samples | RMS abs error of R | max abs error of R |",
        "|---|---|---:|---:|---:|",
    ]
    for mode, values in report["residual_error"].items():
        for jump, numbers in values["by_jump"].items():
            lines.append(f"| {mode} | {jump} | {numbers['samples']} | {numbers['rms']:.4f} | {numbers['max']:.3f} |")
        lines.append(f"| {mode} | all | | **{values['rms']:.4f}** | **{values['max']:.3f}** |")
    delta = report["delta_v"]
    lines += ["", f"Delta_v: RMS {delta['rms_fp32']:.3f} in float32; bf16 error RMS {delta['error_rms']:.4f}, "
                  f"max {delta['error_max']:.4f} (against the clamp of 1)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for bf16_targets.json and bf16_targets.md")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    report = measure(arguments.width, arguments.layers, arguments.batch)
    text = markdown(report)
    print(text)
    if arguments.out:
        arguments.out.mkdir(parents=True, exist_ok=True)
        (arguments.out / "bf16_targets.json").write_text(json.dumps(report, indent=2))
        (arguments.out / "bf16_targets.md").write_text(text)


if __name__ == "__main__":
    main()
