"""A small CNN digit classifier: the judge behind ``twinflow eval``.

Why our own classifier rather than Inception: Inception features of 28 x 28 grayscale digits
(upscaled to 299 x 299 RGB) are a poor, slow description of MNIST, and their weights must be
downloaded. A classifier trained on the very data set the generator learned gives

* the *class accuracy* of class-conditional samples (does a "7" look like a 7?), and
* a feature space (its penultimate layer) in which Fréchet distance and k-NN precision/recall
  are meaningful for digits, computed offline in seconds.

The classifier is trained on real data only, on a documented seeded split (see
:func:`split_indices`), and cached on disk (safetensors weights + a JSON sidecar) so that every
evaluation of every checkpoint uses the same judge.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as functional
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from twinflow.data import DataConfig, ImageDataset, load_dataset
from twinflow.eval.metrics import class_accuracy

CLASSIFIER_VERSION = 1
"""Bumped whenever the architecture or the training recipe changes, so old cache entries are not reused."""

WEIGHTS_FILE = "classifier.safetensors"
SIDECAR_FILE = "classifier.json"
TEST_FRACTION = 0.2
"""Share of the data set held out (by a seeded permutation) to measure the classifier's accuracy."""


@dataclass
class ClassifierConfig:
    """The classifier's architecture; stored in the sidecar so a saved classifier can be rebuilt."""

    image_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    widths: tuple[int, int] = (32, 64)
    feature_dim: int = 128

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["widths"] = list(self.widths)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierConfig:
        known = {"image_channels", "image_size", "num_classes", "widths", "feature_dim"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown classifier architecture keys {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        if "widths" in values:
            values["widths"] = tuple(values["widths"])
        return cls(**values)


class DigitClassifier(nn.Module):
    """Two convolution blocks and a two-layer MLP head for (C, H, W) images in [-1, 1].

    ``forward`` returns logits; :meth:`features` returns the penultimate ``feature_dim`` vector
    (after the ReLU), the space the Fréchet distance and precision/recall are measured in. The
    adaptive pooling lets the same architecture read any image size (28 x 28 MNIST maps to the
    7 x 7 grid it pools to anyway).
    """

    POOLED_SIZE = 7

    def __init__(self, config: ClassifierConfig | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        first, second = self.config.widths
        self.block1 = nn.Sequential(
            nn.Conv2d(self.config.image_channels, first, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(first, second, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(self.POOLED_SIZE)
        self.hidden = nn.Linear(second * self.POOLED_SIZE**2, self.config.feature_dim)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default initialisation, drawn from ``generator`` instead of the global RNG.

        Why: the classifier's weights then depend on the seed passed to :func:`train_classifier`
        only, not on whatever else consumed the global generator before.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)

    def _check(self, images: Tensor) -> None:
        expected = (self.config.image_channels, self.config.image_size, self.config.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"the classifier expects images of shape (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")

    def features(self, images: Tensor) -> Tensor:
        """The penultimate feature vectors (N, feature_dim) of images in [-1, 1]."""
        self._check(images)
        hidden = self.pool(self.block2(self.block1(images)))
        return functional.relu(self.hidden(hidden.flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """``(logits, features)`` of many images, in batches, in eval mode, on the CPU."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        logits, features = [], []
        for chunk in images.split(batch_size):
            chunk_features = self.features(chunk.to(device, torch.float32))
            features.append(chunk_features.cpu())
            logits.append(self.head(chunk_features).cpu())
        self.train(was_training)
        if not logits:
            return torch.zeros(0, self.config.num_classes), torch.zeros(0, self.config.feature_dim)
        return torch.cat(logits), torch.cat(features)


@dataclass
class ClassifierReport:
    """How a classifier was trained and how well it does on its held-out split."""

    test_accuracy: float
    train_count: int
    test_count: int
    split_seed: int
    test_fraction: float
    epochs: int
    seconds: float
    architecture: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None  # the DataConfig the classifier was trained on, when known
    class_names: list[str] = field(default_factory=list)
    version: int = CLASSIFIER_VERSION
    path: str | None = None  # the folder it was loaded from or saved to

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("path")
        return values


def split_indices(count: int, seed: int, test_fraction: float = TEST_FRACTION) -> tuple[Tensor, Tensor]:
    """The classifier's train / held-out split of a data set of ``count`` items.

    A permutation drawn from ``torch.Generator().manual_seed(seed)``; its first
    ``round(count * test_fraction)`` indices are the held-out (test) set, the rest the training
    set; both are returned sorted. The evaluation reuses this exact rule (same count, same seed)
    to find the real images the classifier never saw.
    """
    if count < 2:
        raise ValueError(f"a train/test split needs at least 2 items, got {count}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    test_count = min(count - 1, max(1, round(count * test_fraction)))
    return permutation[test_count:].sort().values, permutation[:test_count].sort().values


def _shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate every image by a random whole-pixel offset in [-max_shift, max_shift] (background fill).

    The only augmentation: generated digits are not always centred like MNIST's, and a
    classifier that has seen small shifts judges them by shape rather than by position.
    """
    if max_shift <= 0:
        return images
    count, _, height, width = images.shape
    padded = functional.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, count), generator=generator)
    rows = offsets[0][:, None] + torch.arange(height)[None, :]  # (N, H)
    columns = offsets[1][:, None] + torch.arange(width)[None, :]  # (N, W)
    batch = torch.arange(count)[:, None, None]
    # gather (N, C, H, W) from padded[n, :, rows[n, i], columns[n, j]]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2).contiguous()


def train_classifier(
    dataset: ImageDataset,
    seed: int = 0,
    epochs: int = 8,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    max_shift: int = 2,
    test_fraction: float = TEST_FRACTION,
    device: str | torch.device = "cpu",
    config: ClassifierConfig | None = None,
    log=None,
) -> tuple[DigitClassifier, ClassifierReport]:
    """Train a :class:`DigitClassifier` on the training part of ``dataset``'s seeded split.

    The split is :func:`split_indices` with ``seed``; the same seed also draws the initial
    weights, the batch order and the shifts, so a call is reproducible. Adam with a cosine
    learning-rate decay; the report holds the accuracy on the held-out part.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    channels, height, width = dataset.image_shape
    if height != width:
        raise ValueError(f"the classifier needs square images, the data set has {height}x{width}")
    config = config or ClassifierConfig(image_channels=channels, image_size=height, num_classes=dataset.num_classes)
    train_indices, test_indices = split_indices(len(dataset), seed, test_fraction)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    classifier = DigitClassifier(config, generator=generator).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    steps_per_epoch = math.ceil(len(train_indices) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / (epochs * steps_per_epoch), 1.0)))
    )
    train_images, train_labels = dataset.images[train_indices], dataset.labels[train_indices]
    start = time.perf_counter()
    classifier.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_indices), generator=generator)
        total_loss = 0.0
        for batch in order.split(batch_size):
            images = _shift(train_images[batch], max_shift, generator).to(device)
            loss = functional.cross_entropy(classifier(images), train_labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
        if log is not None:
            log(f"  classifier epoch {epoch + 1}/{epochs}: loss {total_loss / len(train_indices):.4f}")
    seconds = time.perf_counter() - start
    logits, _ = classifier.predict(dataset.images[test_indices])
    report = ClassifierReport(
        test_accuracy=class_accuracy(logits, dataset.labels[test_indices]),
        train_count=len(train_indices),
        test_count=len(test_indices),
        split_seed=seed,
        test_fraction=test_fraction,
        epochs=epochs,
        seconds=seconds,
        architecture=config.to_dict(),
        class_names=list(dataset.class_names),
    )
    return classifier.eval(), report


# ---- saving, loading, caching ---------------------------------------------------------------


def save_classifier(classifier: DigitClassifier, report: ClassifierReport, folder: str | Path) -> Path:
    """Write ``classifier.safetensors`` and ``classifier.json`` into ``folder``, atomically.

    Written into a hidden temporary folder and renamed into place, so two processes filling the
    same cache entry, or one killed mid-write, never leave a half-written classifier behind.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".{folder.name}.partial.{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    state = {key: value.detach().cpu().contiguous() for key, value in classifier.state_dict().items()}
    save_file(state, str(temporary / WEIGHTS_FILE))
    (temporary / SIDECAR_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    if folder.exists():  # re-saving: replace the old entry
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(temporary, folder)
    except OSError:  # a concurrent writer renamed its copy into place first: keep that one
        shutil.rmtree(temporary, ignore_errors=True)
    report.path = str(folder)
    return folder


def _classifier_files(path: str | Path) -> tuple[Path, Path]:
    """The weights and sidecar of ``path``: a folder holding both, or the ``.safetensors`` / ``.json`` file."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_FILE, path / SIDECAR_FILE
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / WEIGHTS_FILE, path / SIDECAR_FILE  # a folder that does not exist: name its files


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[DigitClassifier, ClassifierReport]:
    """Load a saved classifier: a folder with ``classifier.safetensors`` + ``classifier.json``, or either file."""
    weights_path, sidecar_path = _classifier_files(path)
    for required in (weights_path, sidecar_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"classifier file not found: {required} (a classifier is a {WEIGHTS_FILE} weights file "
                f"with a {SIDECAR_FILE} sidecar, as written by load_or_train_classifier)"
            )
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"classifier sidecar {sidecar_path} is not valid JSON: {error}") from error
    for key in ("architecture", "test_accuracy", "split_seed", "test_fraction"):
        if key not in sidecar:
            raise ValueError(f"classifier sidecar {sidecar_path} has no {key!r} entry")
    if sidecar.get("version") != CLASSIFIER_VERSION:
        raise ValueError(
            f"classifier {sidecar_path} has version {sidecar.get('version')!r}, this code reads version "
            f"{CLASSIFIER_VERSION}; delete it to retrain"
        )
    known = {item.name for item in fields(ClassifierReport)} - {"path"}
    unknown = sorted(set(sidecar) - known)
    if unknown:
        raise ValueError(f"classifier sidecar {sidecar_path} has unknown keys {unknown}; known keys: {sorted(known)}")
    report = ClassifierReport(**sidecar)
    report.path = str(weights_path.parent)
    classifier = DigitClassifier(ClassifierConfig.from_dict(report.architecture))
    try:
        state = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"could not read classifier weights {weights_path}: {error}") from error
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"classifier weights {weights_path} do not fit {sidecar_path}: missing {missing}, unexpected {unexpected}")
    return classifier.to(device).eval(), report


def default_cache_dir() -> Path:
    """``$TWINFLOW_CACHE/classifiers`` when set, else ``~/.cache/twinflow/classifiers``."""
    root = os.environ.get("TWINFLOW_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "twinflow"
    return base / "classifiers"


def cache_key(data_config: DataConfig, seed: int, training: dict[str, Any] | None = None) -> str:
    """A short hash of everything that decides the trained classifier: data, seed, recipe, version."""
    identity = {"data": asdict(data_config), "seed": seed, "version": CLASSIFIER_VERSION, "training": training or {}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{data_config.source}-{digest}"


def load_or_train_classifier(
    data_config: DataConfig,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log=None,
    **training: Any,
) -> tuple[DigitClassifier, ClassifierReport]:
    """The cached classifier for ``data_config`` and ``seed``, training (and caching) it when absent.

    The cache entry is ``<cache_dir>/<source>-<hash>/`` with ``cache_dir`` defaulting to
    :func:`default_cache_dir`; the hash covers the data config, the seed, the training keyword
    arguments and :data:`CLASSIFIER_VERSION`, so a change to any of them trains a new one.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / cache_key(data_config, seed, training)
    if (folder / WEIGHTS_FILE).is_file() and (folder / SIDECAR_FILE).is_file():
        return load_classifier(folder, device=device)
    dataset = load_dataset(data_config)
    if log is not None:
        log(f"training the digit classifier on {len(dataset)} real images (once; cached in {folder})")
    classifier, report = train_classifier(dataset, seed=seed, device=device, log=log, **training)
    report.data = asdict(data_config)
    save_classifier(classifier, report, folder)
    return classifier, report
