"""Time to quality of MNIST demo recipes: 1-NFE class accuracy and Fréchet distance against
training seconds (issue 18).

Each recipe is a training config (plus ``--set`` overrides) trained by the CLI, ``twinflow train``,
the command ``make demo`` runs, with a checkpoint every ``--every`` steps. Every checkpoint is then
scored by ``twinflow eval``'s code (:func:`twinflow.eval.evaluate_checkpoint`, ``--num`` images per
sampler, the same seed everywhere) with the trained weights and with the EMA teacher's. The x axis
is the checkpoint's ``training_seconds``: the loop's wall time, set-up and grids excluded.

    python benchmarks/demo_recipe.py --recipe before=benchmarks/demo_recipes/before_issue18.yaml \\
        --recipe demo=configs/mnist_twinflow.yaml --out benchmarks/results/demo_recipe

A recipe is ``NAME=CONFIG[,key=value,...]``. Runs already in ``RUNS/NAME`` with a summary.json are
scored again, not trained again (``--retrain`` trains them anew). Writes ``demo_recipe.json``,
``demo_recipe.md`` and ``time_to_quality.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_description

from twinflow.eval import evaluate_checkpoint
from twinflow.train.checkpoint import list_checkpoints, read_state

ROOT = Path(__file__).resolve().parent.parent


def parse_recipe(text: str) -> tuple[str, Path, list[str]]:
    name, separator, rest = text.partition("=")
    if not separator or not name or not rest:
        raise SystemExit(f"--recipe must look like NAME=CONFIG[,key=value,...], got {text!r}")
    config, *overrides = rest.split(",")
    return name, Path(config), overrides


def train(name: str, config: Path, overrides: list[str], folder: Path, every: int) -> float:
    """``twinflow train`` for one recipe; returns the command's wall seconds (set-up included)."""
    if folder.exists():
        shutil.rmtree(folder)
    command = [
        str(Path(sys.executable).parent / "twinflow"), "train", "--config", str(config), "--out", str(folder),
        "--set", f"training.checkpoint_every={every}", "--set", "training.keep_checkpoints=1000",
        "--set", "training.tensorboard=false", "--set", "training.sample_every=0",
    ]
    for override in overrides:
        command += ["--set", override]
    print(f"[{name}] {' '.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def score(folder: Path, presets: list[str], num: int, ema: bool) -> list[dict]:
    """Every checkpoint of a run: its step, training seconds and one row per preset."""
    points = []
    for checkpoint in list_checkpoints(folder):
        _, state = read_state(checkpoint)
        report = evaluate_checkpoint(checkpoint, presets=presets, num=num, use_ema=ema, device="cpu")
        points.append({
            "step": state["step"], "training_seconds": state["training_seconds"],
            "rows": {
                row.preset: {"accuracy": row.accuracy, "frechet_distance": row.frechet_distance,
                             "precision": row.precision, "recall": row.recall}
                for row in report.presets
            },
            "real": {"accuracy": report.real_data.accuracy, "frechet_distance": report.real_data.frechet_distance},
        })
        last = points[-1]["rows"]
        print(f"  step {state['step']:5d} {state['training_seconds']:7.1f} s  ema={ema}  "
              + "  ".join(f"{p} {r['accuracy']:.3f}/{r['frechet_distance']:.1f}/p{r['precision']:.2f}/r{r['recall']:.2f}"
                      for p, r in last.items()), flush=True)
    return points


def markdown(results: dict) -> str:
    lines = [
        "# Demo recipes: time to quality", "",
        f"Machine: {results['machine']}. Command: `{results['command']}`", "",
        f"{results['num']} images per sampler; real held-out digits: accuracy {results['real']['accuracy']:.3f}, "
        f"Fréchet distance {results['real']['frechet_distance']:.1f}.", "",
    ]
    presets = results["presets"]
    header = "| recipe | weights | step | training s | " + " | ".join(f"{p} acc / FD" for p in presets) + " |"
    lines += [header, "|" + "---|" * 4 + "---:|" * len(presets)]
    for name, recipe in results["recipes"].items():
        for weights in ("model", "ema"):
            for point in recipe.get(weights, []):
                cells = " | ".join(
                    f"{point['rows'][p]['accuracy']:.3f} / {point['rows'][p]['frechet_distance']:.1f}" for p in presets
                )
                lines.append(f"| {name} | {weights} | {point['step']} | {point['training_seconds']:.0f} | {cells} |")
    lines.append("")
    for name, recipe in results["recipes"].items():
        lines.append(f"- `{name}`: `{recipe['config']}` {' '.join(recipe['overrides'])}; `twinflow train` took "
                     f"{recipe['command_seconds']:.0f} s (set-up included)." if recipe.get("command_seconds") else
                     f"- `{name}`: `{recipe['config']}` {' '.join(recipe['overrides'])} (scored from an earlier run).")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preset = results["presets"][0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, recipe in results["recipes"].items():
        for weights, style in (("model", "--"), ("ema", "-")):
            points = recipe.get(weights, [])
            if not points:
                continue
            seconds = [point["training_seconds"] for point in points]
            label = f"{name} ({weights} weights)"
            left.plot(seconds, [point["rows"][preset]["accuracy"] for point in points], style, marker="o", label=label)
            right.plot(seconds, [point["rows"][preset]["frechet_distance"] for point in points], style, marker="o", label=label)
    real = results["real"]
    left.axhline(real["accuracy"], color="gray", linestyle=":", label="real held-out")
    right.axhline(real["frechet_distance"], color="gray", linestyle=":", label="real held-out")
    right.axhline(2 * real["frechet_distance"], color="gray", linestyle="-.", label="2x real (target)")
    left.set(xlabel="training seconds (2 CPU cores)", ylabel=f"{preset} class accuracy", title=f"{preset}: class accuracy")
    right.set(xlabel="training seconds (2 CPU cores)", ylabel=f"{preset} Fréchet distance", title=f"{preset}: Fréchet distance",
              yscale="log")
    left.set_ylim(0.8, 1.005)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", required=True, help="NAME=CONFIG[,key=value,...]")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_recipe")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "demo_recipe", help="the recipes' run folders")
    parser.add_argument("--every", type=int, default=100, help="checkpoint every N steps")
    parser.add_argument("--presets", default="1nfe,2nfe")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--no-ema", action="store_true", help="score the trained weights only")
    arguments = parser.parse_args()

    presets = arguments.presets.split(",")
    arguments.out.mkdir(parents=True, exist_ok=True)
    results_path = arguments.out / "demo_recipe.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"recipes": {}}
    results.update(machine=machine_description(), presets=presets, num=arguments.num, command="python " + " ".join(sys.argv))
    for text in arguments.recipe:
        name, config, overrides = parse_recipe(text)
        folder = arguments.runs / name
        entry = {"config": str(config), "overrides": overrides}
        if arguments.retrain or not (folder / "summary.json").exists():
            entry["command_seconds"] = train(name, config, overrides, folder, arguments.every)
        else:
            entry["command_seconds"] = results["recipes"].get(name, {}).get("command_seconds")
        for ema in (False,) if arguments.no_ema else (False, True):
            entry["ema" if ema else "model"] = score(folder, presets, arguments.num, ema)
        results["real"] = entry["model"][-1]["real"]
        results["recipes"][name] = entry
        results_path.write_text(json.dumps(results, indent=2))
    (arguments.out / "demo_recipe.md").write_text(markdown(results))
    plot(results, arguments.out / "time_to_quality.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
