"""Model families: one module per family (its prompts, latent geometry and VAE decoding), used by
caching and generation alike. Adding a family means one module here and one adapter in
:mod:`twinflow.adapters`."""

from __future__ import annotations

from typing import Any

from twinflow.families.base import Family
from twinflow.families.flux import FLUX_EMBEDDED_GUIDANCE, FluxFamily
from twinflow.families.qwen_image import QwenImageFamily
from twinflow.families.qwen_image_edit import QwenImageEditFamily, QwenImageEditPlusFamily
from twinflow.families.sana import SanaFamily
from twinflow.families.sd3 import SD3Family
from twinflow.families.z_image import ZImageFamily

FAMILIES: dict[str, Family] = {family.name: family for family in (QwenImageFamily(), ZImageFamily(), SD3Family(), FluxFamily(), SanaFamily())}
"""Families by adapter name."""

PIPELINE_FAMILIES: dict[str, Family] = {
    family.pipeline_class: family for family in (*FAMILIES.values(), QwenImageEditFamily(), QwenImageEditPlusFamily())
}
"""Families by the diffusers pipeline class of a folder's ``model_index.json``; the edit pipelines
share their adapter family (``qwen_image``) with the text-to-image one, so only they are not in
:data:`FAMILIES`."""


def pipeline_family(pipeline: Any) -> Family | None:
    """The family of a loaded pipeline (its class or a base class), or None."""
    names = [klass.__name__ for klass in type(pipeline).__mro__]
    return next((PIPELINE_FAMILIES[name] for name in names if name in PIPELINE_FAMILIES), None)


__all__ = [
    "FAMILIES", "FLUX_EMBEDDED_GUIDANCE", "PIPELINE_FAMILIES", "Family", "FluxFamily", "QwenImageEditFamily",
    "QwenImageEditPlusFamily", "QwenImageFamily", "SD3Family", "SanaFamily",
    "ZImageFamily", "pipeline_family",
]
