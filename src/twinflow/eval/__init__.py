"""Evaluation: sample grids, nearest-neighbour scores, and the ``twinflow eval`` metrics.

``classifier`` (the digit classifier that judges samples), ``metrics`` (class accuracy,
Fréchet distance, k-NN precision/recall) and ``evaluate`` (a checkpoint's presets against real data; :class:`DigitJudge` scores any labelled digits).
"""

from twinflow.eval.classifier import (
    ClassifierConfig,
    ClassifierReport,
    DigitClassifier,
    default_cache_dir,
    load_classifier,
    load_or_train_classifier,
    save_classifier,
    split_indices,
    train_classifier,
)
from twinflow.eval.evaluate import DigitJudge, EvaluationReport, evaluate_checkpoint, inception_fid_available
from twinflow.eval.grid import image_grid, save_grid
from twinflow.eval.metrics import PresetScores, class_accuracy, feature_statistics, frechet_distance, precision_recall
from twinflow.eval.nearest import NearestNeighbourScores, nearest_neighbour_scores

__all__ = [
    "ClassifierConfig",
    "ClassifierReport",
    "DigitClassifier",
    "DigitJudge",
    "EvaluationReport",
    "NearestNeighbourScores",
    "PresetScores",
    "class_accuracy",
    "default_cache_dir",
    "evaluate_checkpoint",
    "feature_statistics",
    "frechet_distance",
    "image_grid",
    "inception_fid_available",
    "load_classifier",
    "load_or_train_classifier",
    "nearest_neighbour_scores",
    "precision_recall",
    "save_classifier",
    "save_grid",
    "split_indices",
    "train_classifier",
]
