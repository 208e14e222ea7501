"""Evaluation helpers: sample grids (and, later, metrics)."""

from twinflow.eval.grid import image_grid, save_grid
from twinflow.eval.nearest import NearestNeighbourScores, nearest_neighbour_scores

__all__ = ["NearestNeighbourScores", "image_grid", "nearest_neighbour_scores", "save_grid"]
