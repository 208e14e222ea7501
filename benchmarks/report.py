"""The benchmark report: one command, a markdown table and PNG plots.

    python benchmarks/report.py --out benchmarks/results [--budget-minutes 9] [--num 500]

Sections (each measured against its baseline in this same run):

1. training cost: seconds, network calls and peak memory per optimizer step of the twinflow,
   rcgm and flow_matching objectives, as ratios to flow matching (:mod:`costs`);
2. method comparison: the three methods trained for the same wall-clock budget from one shared
   flow-matching warm start, scored at 1, 2, 4 NFE (flow matching also at 50) with the project's
   digit classifier (:mod:`methods`); plots of quality against NFE and against training time;
3. sampling cost: images per second at 1 and 50 NFE and the sampler's overhead over bare forward
   passes of the trained TwinFlow network.

Writes ``report.md``, ``report.json``, ``quality_vs_nfe.png`` and ``quality_vs_training_time.png``
into ``--out``; ``--render-only`` rewrites the markdown and plots from an existing ``report.json``.
About 25 minutes with the defaults on 2 cores of an Intel Xeon, 40 on an AMD EPYC.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import costs  # noqa: E402
import methods  # noqa: E402
from machine import machine_description  # noqa: E402
from render import render  # noqa: E402


def run(arguments: argparse.Namespace) -> dict:
    import torch

    from twinflow.data import DataConfig
    from twinflow.eval.classifier import load_or_train_classifier
    from twinflow.train import load_config

    started = time.time()
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(arguments.device)

    print("1/3 training cost (also the step costs that turn the budget into steps)")
    training = costs.training_costs(arguments.config, arguments.batch_size, device=arguments.device)
    seconds_per_step = {name: cost.seconds_per_step for name, cost in training.items()}

    print("2/3 method comparison")
    plans = methods.plan_methods(arguments.budget_minutes * 60, seconds_per_step, arguments.warm_start_fraction)
    checkpoints = methods.train_methods(plans, arguments.config, out / "runs", arguments.batch_size, chunks=arguments.chunks)
    data_config = DataConfig(**load_config(arguments.config)["data"])
    classifier = load_or_train_classifier(data_config, device=device, log=print)
    scores, real = methods.evaluate_methods(checkpoints, arguments.num, classifier, arguments.device)

    print("3/3 sampling cost")

    return {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.time() - started) / 60,
        "settings": {key: value for key, value in vars(arguments).items() if key != "render_only"},
        "classifier_test_accuracy": classifier[1].test_accuracy,
        "training_cost": [asdict(cost) for cost in training.values()],
        "plans": {name: asdict(plan) for name, plan in plans.items()},
        "scores": [asdict(entry) for entry in scores],
        "real_data": real,
        "sampling_cost": sampling(out, arguments),
    }


def sampling(out: Path, arguments: argparse.Namespace) -> list[dict]:
    """Sampling cost of the newest checkpoint of the TwinFlow run in ``out``."""
    import torch

    from twinflow.pipeline import load

    device = torch.device(arguments.device)
    network = load(out / "runs" / "twinflow", device=device).network
    measured = costs.sampling_costs(network, batch_size=arguments.sampling_batch, device=device)
    return [{**asdict(cost), "images_per_second": cost.images_per_second, "overhead": cost.overhead} for cost in measured]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--config", default="configs/mnist_twinflow.yaml", help="architecture, data and learning rates")
    parser.add_argument("--budget-minutes", type=float, default=9.0, help="training budget per method, warm start included")
    parser.add_argument("--warm-start-fraction", type=float, default=0.3)
    parser.add_argument("--chunks", type=int, default=3, help="evaluated points per method after the warm start")
    parser.add_argument("--num", type=int, default=500, help="generated images per evaluated sampler setting")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--sampling-batch", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--render-only", action="store_true", help="rewrite report.md and the plots from report.json")
    parser.add_argument("--sampling-only", action="store_true",
                        help="measure the sampling cost again (on a quiet machine) with the trained TwinFlow run in --out")
    arguments = parser.parse_args()
    out = Path(arguments.out)
    if arguments.render_only or arguments.sampling_only:
        results = json.loads((out / "report.json").read_text())
        if arguments.sampling_only:
            results["sampling_cost"] = sampling(out, arguments)
            (out / "report.json").write_text(json.dumps(results, indent=2))
    else:
        results = run(arguments)
        (out / "report.json").write_text(json.dumps(results, indent=2))
    print(render(results, out))


if __name__ == "__main__":
    main()
