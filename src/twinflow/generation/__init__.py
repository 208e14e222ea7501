"""Text-to-image generation and image editing with TwinFlow diffusers models (Qwen-Image and its
edit pipelines, Z-Image, SD3, Flux, Sana).

The per-family rules (prompt encoding, latent geometry, VAE decoding) are
:mod:`twinflow.families`, shared with caching; here: ``embeddings`` (precomputed conditions in
safetensors), ``loading`` (pipeline folders),
``text_to_image`` (:class:`TextToImage`, the sampler loop), ``edits`` (an edit's prepared
source images), ``images`` (PNG with metadata).
Tiny random folders to try it offline: :mod:`twinflow.testing`. Needs the ``diffusers`` extra.
"""

from twinflow.devices import resolve_dtype
from twinflow.families import FAMILIES, PIPELINE_FAMILIES, Family
from twinflow.generation.edits import EditSources
from twinflow.generation.embeddings import PromptEmbeddings, load_embeddings, save_embeddings
from twinflow.generation.images import read_image_metadata, save_images
from twinflow.generation.loading import folder_family
from twinflow.generation.text_to_image import GenerationResult, PromptEncoder, TextToImage

__all__ = [
    "FAMILIES",
    "PIPELINE_FAMILIES",
    "EditSources",
    "Family",
    "GenerationResult",
    "PromptEmbeddings",
    "PromptEncoder",
    "TextToImage",
    "folder_family",
    "load_embeddings",
    "read_image_metadata",
    "resolve_dtype",
    "save_embeddings",
    "save_images",
]
