"""The report of ``benchmarks/distill.py``: the verdict on each of issue 13's targets, the
markdown table, the plots and the side-by-side sample grids, all from its results dictionary
(``distill.json``), so that ``distill.py --report`` can rewrite them without a run."""

from __future__ import annotations

import json
import math
from pathlib import Path


# ---- the verdicts ---------------------------------------------------------------------------


def verdicts(results: dict) -> list[tuple[str, bool | None, str]]:
    """``(target, met, measured)`` for each of the issue's targets; ``None``: not measurable."""
    base, runs = results["base"]["scores"], {name: run["scores"] for name, run in results["runs"].items()}
    out = []
    minutes, limit = results["minutes"], 25 if results["quick"] else 60
    out.append((f"the whole run takes at most {limit} minutes on 2 CPU cores", minutes <= limit, f"{minutes:.1f} min"))
    twinflow, reference = runs.get("twinflow", {}).get("1nfe"), base.get("multi50")
    if twinflow and reference:
        ratio = twinflow["frechet_distance"] / reference["frechet_distance"]
        out.append(("TwinFlow 1-NFE Fréchet distance <= 1.2x the base's at 50 NFE", ratio <= 1.2,
                    f"{twinflow['frechet_distance']:.1f} vs {reference['frechet_distance']:.1f} ({ratio:.2f}x)"))
        out.append(("... moonshot: <= 1.0x", ratio <= 1.0, f"{ratio:.2f}x"))
        gap = reference["accuracy"] - twinflow["accuracy"]
        out.append(("TwinFlow 1-NFE class accuracy at most 2 points below the base's at 50 NFE", gap <= 0.02,
                    f"{twinflow['accuracy']:.3f} vs {reference['accuracy']:.3f}"))
    rcgm = runs.get("rcgm", {}).get("1nfe")
    if twinflow and rcgm:
        better = {key: (twinflow[key] < rcgm[key]) if key == "frechet_distance" else (twinflow[key] > rcgm[key])
                  for key in ("frechet_distance", "precision", "recall")}
        out.append(("TwinFlow 1-NFE better than RCGM 1-NFE on Fréchet distance, precision and recall", all(better.values()),
                    ", ".join(f"{key.replace('frechet_distance', 'FD')} {twinflow[key]:.3f} vs {rcgm[key]:.3f}" for key in better)))
    if twinflow and all(label in base for label in ("1nfe", "2nfe", "4nfe")):
        fds = [base[label]["frechet_distance"] for label in ("1nfe", "2nfe", "4nfe")]
        out.append(("TwinFlow 1-NFE better than the base at 1, 2 and 4 NFE (Fréchet distance)",
                    all(twinflow["frechet_distance"] < fd for fd in fds),
                    f"{twinflow['frechet_distance']:.1f} vs {', '.join(f'{fd:.1f}' for fd in fds)}"))
    lora, single = runs.get("twinflow_lora", {}).get("1nfe"), runs.get("twinflow_lora_single", {}).get("1nfe")
    if twinflow and lora:
        ratio = lora["frechet_distance"] / twinflow["frechet_distance"]
        out.append(("TwinFlow LoRA (second embedding) 1-NFE Fréchet distance within 1.2x of full-parameter", ratio <= 1.2,
                    f"{lora['frechet_distance']:.1f} vs {twinflow['frechet_distance']:.1f} ({ratio:.2f}x)"))
    if lora and single:
        out.append(("single-embedding LoRA (the reference's t - r/2) measured against the second embedding", None,
                    f"1-NFE FD {single['frechet_distance']:.1f} vs {lora['frechet_distance']:.1f}, "
                    f"accuracy {single['accuracy']:.3f} vs {lora['accuracy']:.3f}"))
    return out


# ---- the report ----------------------------------------------------------------------------------


def _mark(met: bool | None) -> str:
    return "measured" if met is None else ("met" if met else "**missed**")


def markdown(results: dict) -> str:
    real, ceiling = results["real_data"], results["vae_ceiling"]
    lines = [
        f"# A pretrained multi-step transformer becomes a 1-NFE model ({'quick' if results['quick'] else 'full'} run)",
        "",
        f"Machine: {results['machine']}. {results['date']}; {results['minutes']:.1f} minutes in all "
        f"(the base {'reused' if results['base']['reused'] else 'built in this run'}).",
        f"SD3 transformer ({results['parameters']:,} parameters, width {results['settings']['width']}, "
        f"{results['settings']['layers']} blocks), 4 x 8 x 8 latents of 32 x 32 digits, captions \"a handwritten seven\". "
        f"Base: {results['base']['steps']} flow-matching steps; each run {results['settings']['run_seconds']:.0f} s of training. "
        f"{results['settings']['samples']} images per row, digit judge of `twinflow eval`.",
        "",
        "| run | sampler | NFE | class accuracy | Fréchet distance | precision | recall | images/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in (("real data (held-out)", real), ("real data through the VAE", ceiling)):
        lines.append(f"| {name} | - | - | {row['accuracy']:.3f} | {row['frechet_distance']:.1f} | {row['precision']:.3f} | {row['recall']:.3f} | - |")
    groups = [("base (flow matching)", results["base"]["scores"])] + [(name, run["scores"]) for name, run in results["runs"].items()]
    for name, scores in groups:
        for label, row in scores.items():
            lines.append(
                f"| {name} | `{label}` | {row['network_calls']} | {row['accuracy']:.3f} | {row['frechet_distance']:.1f} | "
                f"{row['precision']:.3f} | {row['recall']:.3f} | {row['images_per_second']:.0f} |"
            )
    lines += ["", "| run | steps | s / step | training s |", "|---|---:|---:|---:|"]
    for name, run in results["runs"].items():
        cost = "-" if run["seconds_per_step"] is None else f"{run['seconds_per_step']:.3f}"
        lines.append(f"| {name} | {run['steps']} | {cost} | {run['training_seconds']:.0f} |")
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    for target, met, measured in verdicts(results):
        lines.append(f"| {target} | {measured} | {_mark(met)} |")
    lines += ["", "![sample grids at 1 NFE](comparison.png)", "![quality against NFE](quality_vs_nfe.png)",
              "![quality against training time](quality_vs_training_time.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    groups = [("base (flow matching)", results["base"]["scores"])] + [(name, run["scores"]) for name, run in results["runs"].items()]
    for name, scores in groups:
        rows = sorted(scores.values(), key=lambda row: row["network_calls"])
        for axis, key in zip(axes, ("frechet_distance", "accuracy")):
            axis.plot([row["network_calls"] for row in rows], [row[key] for row in rows], marker="o", label=name)
    for axis, title in zip(axes, ("Fréchet distance (lower is better)", "class accuracy")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("network evaluations per image (NFE)")
        axis.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "quality_vs_nfe.png")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4), dpi=110)
    for name, run in results["runs"].items():
        curve = run["curve"]
        axis.plot([point["training_seconds"] for point in curve], [point["frechet_distance"] for point in curve], marker="o",
                  label=f"{name} ({curve[-1]['sampler'] if curve else ''})")
    reference = results["base"]["scores"].get("multi50")
    if reference:
        axis.axhline(reference["frechet_distance"], color="grey", linestyle=":", label="base, 50 NFE")
    axis.set_yscale("log")
    axis.set_xlabel("training seconds from the base")
    axis.set_ylabel("1-NFE Fréchet distance")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "quality_vs_training_time.png")
    plt.close(figure)


COMPARED = (("base", "1nfe", "base, 1 Euler step"), ("base", "multi50", "base, 50 Euler steps"),
            ("twinflow", "1nfe", "TwinFlow, 1 NFE"), ("rcgm", "1nfe", "RCGM, 1 NFE"),
            ("twinflow_lora", "1nfe", "TwinFlow LoRA, 1 NFE"), ("twinflow_lora_single", "1nfe", "LoRA, single embedding, 1 NFE"))


def comparison(results: dict, out: Path) -> Path | None:
    """``comparison.png``: the sample grids of the base and of each method at 1 NFE side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    panels = [(f"{title}: FD {scores[sampler]['frechet_distance']:.1f}", out / "grids" / f"{run}_{sampler}.png")
              for run, sampler, title in COMPARED
              for scores in [results["base"]["scores"] if run == "base" else results["runs"].get(run, {}).get("scores", {})]
              if sampler in scores and (out / "grids" / f"{run}_{sampler}.png").is_file()]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.9 * rows), dpi=110, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (title, path) in zip(axes.flat, panels):
        axis.imshow(Image.open(path).convert("L"), cmap="gray")
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "comparison.png")
    plt.close(figure)
    return out / "comparison.png"


def write_report(results: dict, out: Path) -> None:
    """``distill.json``, ``distill.md`` and the pictures from the results."""
    (out / "distill.json").write_text(json.dumps(results, indent=2))
    (out / "distill.md").write_text(markdown(results))
    plot(results, out)
    comparison(results, out)
