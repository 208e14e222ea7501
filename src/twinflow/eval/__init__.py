"""Evaluation helpers: sample grids (and, later, metrics)."""

from twinflow.eval.grid import image_grid, save_grid

__all__ = ["image_grid", "save_grid"]
