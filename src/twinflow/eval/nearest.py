"""Pixel-space nearest-neighbour scores: a judge-free check of class-conditional samples.

Each generated image is compared with real images in pixel space:

* ``accuracy``: the share of samples whose nearest real image carries the class the sample was
  asked for (1-nearest-neighbour classification; chance is 1 / classes);
* ``distance``: the root-mean-square pixel distance (images in [-1, 1]) to the nearest real
  image *of the asked-for class*; blurry or noisy samples lie far from every real digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NearestNeighbourScores:
    accuracy: float
    distance: float


def nearest_neighbour_scores(
    images: Tensor, labels: Tensor, reference_images: Tensor, reference_labels: Tensor
) -> NearestNeighbourScores:
    """Scores of ``images`` (N, C, H, W) in [0, 1] against ``reference_images`` in [-1, 1]."""
    if images.shape[1:] != reference_images.shape[1:]:
        raise ValueError(f"image shape {tuple(images.shape[1:])} differs from the reference {tuple(reference_images.shape[1:])}")
    generated = images.flatten(1).float() * 2 - 1
    reference = reference_images.flatten(1).float()
    distances = torch.cdist(generated, reference)
    accuracy = (reference_labels[distances.argmin(dim=1)] == labels).float().mean().item()
    other_class = reference_labels[None, :] != labels[:, None]
    same_class = distances.masked_fill(other_class, float("inf")).min(dim=1).values
    return NearestNeighbourScores(accuracy=accuracy, distance=(same_class / reference.shape[1] ** 0.5).mean().item())
