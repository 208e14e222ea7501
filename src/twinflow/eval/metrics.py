"""Sample-quality metrics on classifier features: class accuracy, Fréchet distance, precision/recall.

* :func:`class_accuracy`: the share of samples a classifier assigns to the class they were asked
  for; measures whether class conditioning works.
* :func:`frechet_distance`: the distance between two Gaussians fitted to two feature sets
  (FID when the features are Inception's; here a digit classifier's penultimate layer). One
  number for fidelity *and* diversity, biased upwards at small sample sizes, so compare values
  only at the same number of images.
* :func:`precision_recall`: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models": each set's manifold is the union of balls around its points with
  the radius of the k-th nearest neighbour within the set. Precision (fidelity) is the share of
  generated points inside the real manifold; recall (diversity) the share of real points inside
  the generated manifold. A generator collapsed onto a few good images has high precision and low
  recall, which a Fréchet distance alone would not tell apart from blur.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class PresetScores:
    """The quality of one sampler preset's images (or of held-out real images, the reference row).

    ``seconds`` and ``images_per_second`` time the sampling only (``None`` for real data).
    ``inception_frechet_distance`` is filled only when ``--inception`` was asked for and possible.
    """

    preset: str
    network_calls: int
    accuracy: float
    frechet_distance: float
    precision: float
    recall: float
    seconds: float | None
    images_per_second: float | None
    count: int = 0
    inception_frechet_distance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """The share of rows of ``logits`` (N, K) whose arg-max equals ``labels`` (N,)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, classes), got {tuple(logits.shape)}")
    labels = torch.as_tensor(labels).flatten()
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("class_accuracy needs at least one sample")
    return (logits.argmax(dim=1).cpu() == labels.cpu()).float().mean().item()


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of ``features`` (N, D), in float64.

    float64 because the Fréchet distance subtracts traces of similar size; float32 covariances
    of a few hundred dimensions lose the digits that matter.
    """
    array = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"feature statistics need at least 2 feature vectors, got {array.shape[0]}")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix; negative round-off eigenvalues clip to 0."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _trace_sqrt_product_eigen(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrt(S1 S2)`` via the symmetric form ``tr sqrt(S1^1/2 S2 S1^1/2)``.

    ``S1 S2`` is similar to ``S1^1/2 S2 S1^1/2`` (a symmetric PSD matrix), so the traces of the
    square roots agree, and the symmetric form needs only ``eigh``, which is stable even when the
    covariances are singular (fewer samples than dimensions).
    """
    root = _symmetric_sqrt(sigma1)
    inner = root @ sigma2 @ root
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray) -> float | None:
    """``tr sqrtm(S1 S2)`` with ``scipy.linalg.sqrtm`` (the reference FID computation), or None.

    None when scipy is missing or its result is unusable (non-finite even after the small
    diagonal offset the reference implementation adds, or a clearly complex square root); the
    caller then uses the eigen route, which is exact for PSD inputs.
    """
    try:
        from scipy import linalg
    except ImportError:
        return None
    # Feature covariances are often singular (dead ReLU units, fewer samples than dimensions);
    # scipy then warns, and the checks below decide whether its result is usable.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            offset = np.eye(sigma1.shape[0]) * 1e-6
            root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        scale = max(1.0, float(np.abs(root).max()))
        if np.abs(root.imag).max() > 1e-3 * scale:
            return None
        root = root.real
    return float(np.trace(root))


def frechet_distance(
    mu1: np.ndarray | Tensor,
    sigma1: np.ndarray | Tensor,
    mu2: np.ndarray | Tensor,
    sigma2: np.ndarray | Tensor,
    method: str = "auto",
) -> float:
    """The Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``, in float64.
    ``method``: ``"scipy"`` (``scipy.linalg.sqrtm`` of the product, as in the reference FID code),
    ``"eigen"`` (the symmetric form, eigendecompositions only) or ``"auto"`` (scipy when importable
    and its result is real and finite, else eigen). Round-off below zero is clipped: the result
    is a float >= 0.
    """
    mu1, mu2 = (np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=np.float64) for v in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=np.float64) for v in (sigma1, sigma2))
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    dimension = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != mu1.shape:
        raise ValueError(f"means must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dimension, dimension):
            raise ValueError(f"{name} must have shape ({dimension}, {dimension}) to match the means, got {sigma.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} has non-finite entries")
    if method not in ("auto", "scipy", "eigen"):
        raise ValueError(f"method must be 'auto', 'scipy' or 'eigen', got {method!r}")

    trace_sqrt = None
    if method in ("auto", "scipy"):
        trace_sqrt = _trace_sqrt_product_scipy(sigma1, sigma2)
        if trace_sqrt is None and method == "scipy":
            raise ValueError("scipy is not importable or its sqrtm gave no real, finite result; use method='eigen'")
    if trace_sqrt is None:
        trace_sqrt = _trace_sqrt_product_eigen(sigma1, sigma2)
    difference = mu1 - mu2
    value = float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(value, 0.0)


def _kth_neighbour_radii(features: Tensor, k: int, chunk_size: int) -> Tensor:
    """Distance of every row to its k-th nearest *other* row (its own zero distance is skipped)."""
    radii = []
    for chunk in features.split(chunk_size):
        distances = torch.cdist(chunk, features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the smallest is the point itself
    return torch.cat(radii)


def _share_inside(points: Tensor, centres: Tensor, radii: Tensor, chunk_size: int) -> float:
    """The share of ``points`` within ``radii[j]`` of some ``centres[j]`` (the k-NN manifold)."""
    inside = []
    for chunk in points.split(chunk_size):
        inside.append((torch.cdist(chunk, centres) <= radii[None, :]).any(dim=1))
    return torch.cat(inside).float().mean().item()


def precision_recall(
    real_features: Tensor, fake_features: Tensor, k: int = 3, chunk_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake_features`` against ``real_features``.

    Both (N, D); k-NN radii with ``k`` (3 in the paper). Distances are computed ``chunk_size``
    rows at a time with ``torch.cdist``, so memory stays at ``chunk_size x N``. The radii depend
    on the set sizes (more points, smaller balls): compare sets of equal size, as the evaluation does.
    """
    real = torch.as_tensor(real_features).detach().float()
    fake = torch.as_tensor(fake_features).detach().float().to(real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with one D, got real {tuple(real.shape)} and fake {tuple(fake.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, features in (("real", real), ("fake", fake)):
        if features.shape[0] <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} feature vectors, got {features.shape[0]}")
    real_radii = _kth_neighbour_radii(real, k, chunk_size)
    fake_radii = _kth_neighbour_radii(fake, k, chunk_size)
    precision = _share_inside(fake, real, real_radii, chunk_size)
    recall = _share_inside(real, fake, fake_radii, chunk_size)
    return precision, recall
