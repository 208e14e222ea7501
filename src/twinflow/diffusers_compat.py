"""What differs between the diffusers releases this project supports, in one place.

The adapters hook only a transformer's time embedding and call its unmodified ``forward``, so
most of diffusers' changes never reach them. What does (tested on every supported release by
``make test-compat``, see the README):

* ``from_pretrained`` takes the weights' dtype as ``dtype`` from 0.40 on (``torch_dtype`` before,
  deprecated since): :func:`loading_arguments`;
* before 0.40 ``ZImageTransformer2DModel`` leaves its pad tokens ``torch.empty`` when built from a
  config (loaded weights overwrite them); the tiny test models zero them
  (:func:`twinflow.testing.initialised`).

The floor is 0.37: 0.36's ``QwenImageTransformer2DModel`` has no ``zero_cond_t`` (Edit-2511).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["diffusers_version", "loading_arguments"]


@lru_cache(maxsize=1)
def diffusers_version() -> tuple[int, int]:
    """(major, minor) of the installed diffusers."""
    import diffusers

    major, minor = diffusers.__version__.split(".")[:2]
    return int(major), int(minor)


def loading_arguments(options: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the installed diffusers: ``dtype`` becomes
    ``torch_dtype`` before 0.40."""
    if "dtype" in options and diffusers_version() < (0, 40):
        options = dict(options)
        options["torch_dtype"] = options.pop("dtype")
    return options
