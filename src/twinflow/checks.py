"""The value checks every config and state reader shares: what counts as an integer or a number.

Python counts ``True`` as the integer 1, and numpy's scalars are not ``int``/``float``; a config
key or a state field that wants a count means neither a bool nor a string, but takes a numpy
integer. One definition, so that ``steps: true`` is refused alike by the objective, the sampler,
the run config and a resumed state.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def is_integer(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (Python or numpy, integer or float, possibly inf or nan), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A finite real number, not a bool."""
    return is_number(value) and math.isfinite(value)
