"""``twinflow eval``: the sample quality of a checkpoint's sampler presets against real data.

For each preset, ``num`` class-conditional samples (balanced over the classes) are judged by a
digit classifier trained on the checkpoint's own data set (:mod:`twinflow.eval.classifier`):
class accuracy, Fréchet distance and k-NN precision/recall in its penultimate feature space
(:mod:`twinflow.eval.metrics`), and the sampling's wall time.

Which real images are compared with what (why the split matters):

* the *reference set* is the classifier's training part of the checkpoint's data set (the
  seeded split of :func:`~twinflow.eval.classifier.split_indices`): the real distribution;
* the *held-out set* is the classifier's test part: real images the classifier never saw. They
  are scored exactly like samples (``real data`` row), which shows the best numbers a perfect
  generator could reach at this sample size: a Fréchet distance is biased upwards at small
  sizes and precision/recall depend on the set sizes, so absolute values mean little alone.

Precision and recall compare equal-sized sets: the reference is cut to the size of the set it
is compared with (a fixed seeded subset), because k-NN radii shrink as a set grows.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from twinflow.data import DataConfig, load_dataset
from twinflow.eval.classifier import ClassifierReport, DigitClassifier, load_classifier, load_or_train_classifier, split_indices
from twinflow.eval.metrics import PresetScores, class_accuracy, feature_statistics, frechet_distance, precision_recall

if TYPE_CHECKING:  # for the annotations only: the functions import pipeline and sampler when called, as before
    import numpy as np

    from twinflow.pipeline import ClassConditionalGenerator
    from twinflow.sampler import SamplerConfig

DEFAULT_PRESETS: tuple[str, ...] = ("1nfe", "2nfe", "4nfe", "multi")
REAL_DATA_ROW = "real data (held-out)"
CLASSIFIER_SEED = 0
"""The classifier's split and training seed. Fixed (not the evaluation's ``--seed``) so that every
evaluation of every checkpoint on one data set shares the same judge and the same held-out images."""

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


@dataclass
class EvaluationReport:
    """Scores of each preset, of held-out real images, and what they were measured with."""

    checkpoint: str
    step: int | None
    presets: list[PresetScores]
    real_data: PresetScores | None
    classifier_test_accuracy: float
    classifier_path: str | None
    num: int
    seed: int
    k: int
    use_ema: bool
    device: str
    reference_count: int
    held_out_count: int
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    inception_message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps(report.to_dict())``)."""
        values = asdict(self)
        values["presets"] = [scores.to_dict() for scores in self.presets]
        values["real_data"] = self.real_data.to_dict() if self.real_data is not None else None
        return values

    def to_markdown(self) -> str:
        """A short header and one table row per preset, the real-data row first."""
        with_inception = any(row.inception_frechet_distance is not None for row in self._rows())
        ema = "EMA weights" if self.use_ema else "model weights"
        lines = [
            f"Checkpoint `{self.checkpoint}` (step {self.step}, {ema}), {self.num} images per preset, seed {self.seed}, "
            f"device {self.device}.",
            f"Digit classifier: held-out accuracy {self.classifier_test_accuracy:.2%}"
            + (f" (`{self.classifier_path}`)" if self.classifier_path else "")
            + f"; reference set {self.reference_count} real images, held-out set {self.held_out_count}; "
            f"precision/recall with k={self.k}.",
            "",
        ]
        header = ["preset", "NFE", "images", "accuracy", "Fréchet distance", "precision", "recall", "seconds", "images/s"]
        if with_inception:
            header.append("Inception FD")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if index == 0 else "---:" for index in range(len(header))) + "|")
        for row in self._rows():
            cells = [
                row.preset,
                str(row.network_calls) if row.preset != REAL_DATA_ROW else "-",
                str(row.count),
                f"{row.accuracy:.3f}",
                f"{row.frechet_distance:.3f}",
                _optional(row.precision, "{:.3f}"),
                _optional(row.recall, "{:.3f}"),
                _optional(row.seconds, "{:.2f}"),
                _optional(row.images_per_second, "{:.1f}"),
            ]
            if with_inception:
                cells.append(_optional(row.inception_frechet_distance, "{:.2f}"))
            lines.append("| " + " | ".join(cells) + " |")
        for note in self.notes:
            lines.append(f"\nNote: {note}")
        if self.inception_message:
            lines.append(f"\nInception FID: {self.inception_message}")
        return "\n".join(lines)

    def _rows(self) -> list[PresetScores]:
        return ([self.real_data] if self.real_data is not None else []) + list(self.presets)


def _optional(value: float | None, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


# ---- Inception FID (optional, never downloads) ----------------------------------------------


def inception_weights_path() -> Path:
    """Where torch-fidelity (and torchmetrics through it) keeps its Inception weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_fid_available() -> tuple[bool, str]:
    """Whether an Inception-feature FID can be computed here *without downloading anything*.

    Needs the ``torch_fidelity`` package (torchmetrics' FID uses torch-fidelity's Inception
    too, so torchmetrics alone is not enough) and its weights file already in the torch hub
    cache. Returns ``(False, what is missing and how to get it)`` otherwise; nothing is imported
    beyond a module lookup and nothing is fetched.
    """
    problems = []
    if importlib.util.find_spec("torch_fidelity") is None:
        if importlib.util.find_spec("torchmetrics") is not None:
            problems.append("torchmetrics is installed, but its FID needs torch-fidelity's Inception network: "
                            "run `pip install torch-fidelity`")
        else:
            problems.append("neither torch-fidelity nor torchmetrics is installed: run `pip install torch-fidelity`")
    weights = inception_weights_path()
    if not weights.is_file():
        problems.append(
            f"the Inception weights file {weights} is absent: download {INCEPTION_WEIGHTS_URL} into that folder "
            "(torch-fidelity does so on first use when online; the folder follows $TORCH_HOME)"
        )
    if problems:
        return False, "not computed; " + "; ".join(problems) + "."
    return True, f"computed with torch-fidelity's Inception-v3 (2048-d pool features), weights {weights}"


def _inception_features(images: Tensor, device: torch.device, batch_size: int = 100) -> Tensor:
    """Inception-v3 pool features (N, 2048) of images (N, C, H, W) in [0, 1] (grayscale repeated to RGB)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_weights_path())
    ).to(device).eval()
    features = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            pixels = (chunk.clamp(0, 1) * 255).round().to(torch.uint8)
            if pixels.shape[1] == 1:
                pixels = pixels.repeat(1, 3, 1, 1)
            features.append(extractor(pixels.to(device))[0].float().cpu())
    return torch.cat(features)


# ---- the evaluation -------------------------------------------------------------------------


def balanced_labels(num: int, num_classes: int) -> Tensor:
    """``num`` labels, class-major, as even over the classes as possible (the first classes get the remainder)."""
    return (torch.arange(num) % num_classes).sort().values


def _checkpoint_state(checkpoint: str | Path) -> tuple[Path, dict[str, Any]]:
    from twinflow.train.checkpoint import STATE_FILE, read_state

    folder, state = read_state(checkpoint)
    state_path = folder / STATE_FILE
    if not isinstance(state.get("config"), dict) or not isinstance(state["config"].get("data"), dict):
        raise ValueError(f"checkpoint state file {state_path} has no 'config.data' entry: cannot tell which real data to compare with")
    return folder, state


def _resolve_classifier(
    classifier: str | Path | tuple[DigitClassifier, ClassifierReport] | None,
    data_config: DataConfig,
    cache_dir: str | Path | None,
    device: torch.device,
    log: Callable[[str], None] | None,
) -> tuple[DigitClassifier, ClassifierReport]:
    if classifier is None:
        return load_or_train_classifier(data_config, cache_dir=cache_dir, seed=CLASSIFIER_SEED, device=device, log=log)
    if isinstance(classifier, (str, Path)):
        return load_classifier(classifier, device=device)
    network, report = classifier
    return network.to(device).eval(), report


@dataclass
class DigitJudge:
    """The judge of one data set: its classifier, the real reference features, the held-out images.

    :meth:`score` rates any labelled images (a checkpoint's samples, a text-to-image model's
    digits, a file of images) on the same footing; :meth:`real_data` scores held-out real images
    the same way, the best a perfect generator could reach at that sample size.
    """

    classifier: DigitClassifier
    report: ClassifierReport
    data_config: DataConfig
    reference_statistics: tuple
    reference_subset: Tensor  # seeded order of the reference features: the first n face a set of n
    held_out_images: Tensor  # in [-1, 1], seeded order
    held_out_labels: Tensor
    reference_count: int
    held_out_count: int
    k: int = 3
    batch_size: int = 500

    @classmethod
    def for_data(
        cls,
        data_config: DataConfig,
        classifier: str | Path | tuple[DigitClassifier, ClassifierReport] | None = None,
        *,
        seed: int = 0,
        k: int = 3,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        batch_size: int = 500,
        log: Callable[[str], None] | None = None,
    ) -> "DigitJudge":
        """The judge of ``data_config``'s data set; ``classifier`` as :func:`evaluate_checkpoint`
        takes it (``None``: the cached one, trained once). ``seed`` orders the seeded subsets."""
        network, report = _resolve_classifier(classifier, data_config, cache_dir, torch.device(device), log)
        dataset = load_dataset(data_config)
        reference_indices, held_out_indices = split_indices(len(dataset), report.split_seed, report.test_fraction)
        subsets = torch.Generator().manual_seed(seed)
        _, reference_features = network.predict(dataset.images[reference_indices], batch_size)
        # A fixed seeded order of the reference; its first n rows are compared with a set of n images.
        reference_subset = reference_features[torch.randperm(len(reference_indices), generator=subsets)]
        held_out = held_out_indices[torch.randperm(len(held_out_indices), generator=subsets)]
        return cls(
            network, report, data_config, feature_statistics(reference_features), reference_subset,
            dataset.images[held_out], dataset.labels[held_out], len(reference_indices), len(held_out_indices), k, batch_size,
        )

    def score(self, name: str, images: Tensor, labels: Tensor, network_calls: int = 0) -> PresetScores:
        """Scores of ``images`` (N, C, H, W) in [0, 1] that were asked to show digits ``labels``."""
        logits, features = self.classifier.predict(images * 2 - 1, self.batch_size)
        return self._scores(name, network_calls, logits, features, labels)

    def real_data(self, num: int) -> PresetScores:
        """Scores of the first ``num`` held-out real images (all of them when there are fewer)."""
        images = self.held_out_images[:num]
        logits, features = self.classifier.predict(images, self.batch_size)
        return self._scores(REAL_DATA_ROW, 0, logits, features, self.held_out_labels[:num])

    def _scores(self, name: str, network_calls: int, logits: Tensor, features: Tensor, labels: Tensor) -> PresetScores:
        if features.shape[0] < max(2, self.k + 1):
            raise ValueError(f"{name}: {features.shape[0]} images are too few for Fréchet statistics and k={self.k} precision/recall")
        mean, covariance = feature_statistics(features)
        precision, recall = precision_recall(self.reference_subset[: features.shape[0]], features, k=self.k)
        return PresetScores(
            preset=name,
            network_calls=network_calls,
            accuracy=class_accuracy(logits, labels),
            frechet_distance=frechet_distance(mean, covariance, *self.reference_statistics),
            precision=precision,
            recall=recall,
            seconds=None,
            images_per_second=None,
            count=int(features.shape[0]),
        )


def evaluate_checkpoint(
    checkpoint: str | Path,
    presets: Sequence[str] = DEFAULT_PRESETS,
    num: int = 1000,
    classifier: str | Path | tuple[DigitClassifier, ClassifierReport] | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    use_ema: bool = False,
    k: int = 3,
    inception: bool = False,
    cache_dir: str | Path | None = None,
    batch_size: int = 500,
    log: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Score ``num`` samples of each sampler preset of ``checkpoint`` (a checkpoint or run folder).

    ``presets`` are preset names or specs such as ``"multi:steps=50"``
    (:func:`twinflow.sampler.sampler_from_spec`); each names its row of the report.

    ``classifier``: ``None`` uses (or trains once and caches) the classifier for the checkpoint's
    data set; a path loads a saved one; a ``(classifier, report)`` pair is used as given.
    ``seed`` fixes the sampling noise and the seeded subsets. ``inception`` adds an Inception
    FID column when :func:`inception_fid_available` says it can, else only its message.
    Timings are wall time of the sampling alone, after a small warm-up call per preset.
    """
    from twinflow.devices import resolve_device

    # ---- the arguments, the checkpoint's model and its judge -------------------------------
    presets = list(presets)
    configs = _sampler_configs(presets, num, k)  # before anything is loaded
    device = resolve_device(device)
    folder, state = _checkpoint_state(checkpoint)
    data_config = DataConfig(**state["config"]["data"])
    judge = DigitJudge.for_data(
        data_config, classifier, seed=seed, k=k, device=device, cache_dir=cache_dir, batch_size=batch_size, log=log
    )
    generator = _load_generator(folder, judge, device, use_ema)

    # ---- the real-data row and the optional Inception reference ----------------------------
    real_data, notes = _real_data_row(judge, data_config, num)
    available, inception_message = inception_fid_available() if inception else (False, None)
    inception_reference = _inception_reference(judge, data_config, real_data, num, device) if available else None

    # ---- one row per preset -----------------------------------------------------------------
    labels = balanced_labels(num, generator.num_classes)
    rows = [
        _score_preset(
            generator, judge, preset, configs[preset], labels, seed=seed, batch_size=batch_size,
            inception_reference=inception_reference, device=device, log=log,
        )
        for preset in presets
    ]
    return EvaluationReport(
        checkpoint=str(folder),
        step=state.get("step"),
        presets=rows,
        real_data=real_data,
        classifier_test_accuracy=judge.report.test_accuracy,
        classifier_path=judge.report.path,
        num=num,
        seed=seed,
        k=k,
        use_ema=use_ema,
        device=str(device),
        reference_count=judge.reference_count,
        held_out_count=judge.held_out_count,
        data=asdict(data_config),
        notes=notes,
        inception_message=inception_message,
    )


def _sampler_configs(presets: list[str], num: int, k: int) -> dict[str, SamplerConfig]:
    """Each preset spec's sampler config; a bad spec or a too small ``num`` fails here, early."""
    from twinflow.sampler import SAMPLER_PRESETS, sampler_from_spec

    if not presets:
        raise ValueError(f"no sampler presets given; choose from {sorted(SAMPLER_PRESETS)}")
    configs = {spec: sampler_from_spec(spec) for spec in presets}  # fails early, naming the bad spec
    if num < max(2, k + 1):
        raise ValueError(f"--num must be at least {max(2, k + 1)} (Fréchet statistics and k={k} precision/recall), got {num}")
    return configs


def _load_generator(folder: Path, judge: DigitJudge, device: torch.device, use_ema: bool) -> ClassConditionalGenerator:
    """The checkpoint's sampler, once the judge's classifier is known to read the images it makes."""
    from twinflow.pipeline import load

    generator = load(folder, device=device, use_ema=use_ema)
    expected = {
        "image_channels": generator.image_shape[0], "image_size": generator.image_shape[1], "num_classes": generator.num_classes,
    }
    found = {key: judge.classifier.config.to_dict()[key] for key in expected}
    if found != expected:
        raise ValueError(f"the classifier ({judge.report.path or 'given'}) reads {found} but checkpoint {folder} makes {expected}")
    return generator


def _real_data_row(judge: DigitJudge, data_config: DataConfig, num: int) -> tuple[PresetScores | None, list[str]]:
    """The held-out real images' scores (``None`` when too few), and the report's notes on what
    makes the numbers less comparable than they look."""
    notes = []
    if judge.report.data != asdict(data_config):
        notes.append(
            f"the classifier was trained on data {judge.report.data}, the checkpoint on {asdict(data_config)}; "
            "the held-out images may include images the classifier saw, so its real-data row may be optimistic"
        )
    if num > judge.reference_count:
        notes.append(f"precision/recall use all {judge.reference_count} reference images against {num} samples (unequal sizes)")
    real_data = None
    if min(num, judge.held_out_count) >= max(2, judge.k + 1):
        real_data = judge.real_data(num)
        if judge.held_out_count < num:
            notes.append(f"the real-data row has only {judge.held_out_count} held-out images (not {num}): its Fréchet distance is biased upwards")
    else:
        notes.append(f"no real-data row: only {judge.held_out_count} held-out images (needs {max(2, judge.k + 1)})")
    return real_data, notes


def _inception_reference(
    judge: DigitJudge, data_config: DataConfig, real_data: PresetScores | None, num: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Inception feature statistics of the reference set; fills ``real_data``'s Inception FD too."""
    dataset = load_dataset(data_config)
    reference_indices, _ = split_indices(len(dataset), judge.report.split_seed, judge.report.test_fraction)
    reference = feature_statistics(_inception_features((dataset.images[reference_indices] + 1) / 2, device))
    if real_data is not None:
        mean, covariance = feature_statistics(_inception_features((judge.held_out_images[:num] + 1) / 2, device))
        real_data.inception_frechet_distance = frechet_distance(mean, covariance, *reference)
    return reference


def _score_preset(
    generator: ClassConditionalGenerator,
    judge: DigitJudge,
    preset: str,
    config: SamplerConfig,
    labels: Tensor,
    *,
    seed: int,
    batch_size: int,
    inception_reference: tuple[np.ndarray, np.ndarray] | None,
    device: torch.device,
    log: Callable[[str], None] | None,
) -> PresetScores:
    """One preset's row: ``labels`` sampled with ``config`` (after a small warm-up call), scored and timed."""
    num = len(labels)
    if log is not None:
        log(f"sampling {num} images with preset {preset}")
    generator.sample(labels=labels[: min(num, 2 * generator.num_classes)], preset=config, seed=seed, batch_size=batch_size)  # warm-up
    samples = generator.sample(labels=labels, preset=config, seed=seed, batch_size=batch_size)
    scores = judge.score(preset, samples.images, samples.labels, samples.network_calls)
    scores.seconds = samples.seconds
    scores.images_per_second = num / max(samples.seconds, 1e-9)
    if inception_reference is not None:
        mean, covariance = feature_statistics(_inception_features(samples.images, device))
        scores.inception_frechet_distance = frechet_distance(mean, covariance, *inception_reference)
    return scores
