"""The tiny text-to-image set-up of the training tests: a random Z-Image transformer and a latent cache.

``save_tiny_transformer(folder)`` writes a 2-layer ``ZImageTransformer2DModel`` with random
weights (``save_pretrained``, as ``model.path`` expects) and ``write_tiny_cache(folder)`` a
latent cache of ITEMS random latents with deterministic caption embeddings and the empty-prompt
null condition (``cache_dataset``, as ``data.root`` expects). Both are seeded, so every test
module (and every spawned process) that builds them gets the same weights and data.
Import it in tests with ``from tiny_text_to_image import ...`` (pytest puts ``tests/`` on
``sys.path``); it needs diffusers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from twinflow.data import cache_dataset
from twinflow.testing import initialised

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny_text_to_image.yaml"
CHANNELS, SIZE, TOKENS, WIDTH, ITEMS = 4, 8, 5, 16, 8
# A small adapter on every attention projection (the LoRA tests' training.lora override).
LORA = "training.lora={rank: 4, alpha: 8, target_modules: [to_q, to_k, to_v, to_out.0]}"


class RandomLatents:
    """A captioned "dataset" whose images are already latents (the identity is the VAE)."""

    description = "random latents"

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(ITEMS, CHANNELS, SIZE, SIZE, generator=generator) * 2 - 1
        self.captions = [f"caption {index}" for index in range(ITEMS)]

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, indices: torch.Tensor):
        return self.images[indices], [self.captions[int(index)] for index in indices]


def identity(images: torch.Tensor) -> torch.Tensor:
    return images.clone()


def encode_prompts(captions: list[str]) -> dict[str, torch.Tensor]:
    """Deterministic embeddings from the characters; token 0 (a "BOS") is always unmasked.

    Each character gets its own direction (a sinusoid whose frequency is its code): Z-Image's
    caption embedder starts with an RMSNorm, so tokens that differ only in scale would be equal.
    """
    embeds = torch.zeros(len(captions), TOKENS, WIDTH)
    mask = torch.zeros(len(captions), TOKENS, dtype=torch.int64)
    features = torch.arange(WIDTH, dtype=torch.float32)
    for row, caption in enumerate(captions):
        codes = [1.0] + [ord(char) / 100 for char in caption[: TOKENS - 1]]
        for token, code in enumerate(codes):
            embeds[row, token] = torch.sin(features * code + token)
        mask[row, : len(codes)] = 1
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def save_tiny_transformer(folder: Path, family: str = "z_image") -> Path:
    """A random 2-layer Z-Image (or Sana, or Qwen-Image) transformer saved into ``folder``; returns ``folder``."""
    import diffusers

    torch.manual_seed(0)
    if family == "qwen_image":  # 2 x 2 latent patches per token: CHANNELS * 4 features in
        transformer = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * CHANNELS, out_channels=CHANNELS, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=WIDTH, axes_dims_rope=(4, 6, 6),
        )
    elif family == "sana":
        transformer = diffusers.SanaTransformer2DModel(
            in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=WIDTH,
            sample_size=SIZE, patch_size=1,
        )
    else:
        transformer = diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=CHANNELS, dim=32, n_layers=2,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=WIDTH, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32],
        )
    initialised(transformer).save_pretrained(folder)  # pad tokens zeroed on every diffusers release
    return folder


def write_tiny_cache(folder: Path) -> Path:
    """The latent cache of :class:`RandomLatents` with :func:`encode_prompts`; returns ``folder``."""
    cache_dataset(RandomLatents(), identity, encode_prompts, folder, shard_size=5, batch_size=4, progress=False, null_prompt="")
    return folder


def write_captioned_images(folder: Path, count: int, shape: tuple[int, int] = (16, 16), broken: bool = False) -> Path:
    """``count`` random RGB images of ``shape`` (height, width) with same-name ``.txt`` captions, as
    ``twinflow cache --data`` reads them; ``broken`` adds a corrupt image with its caption."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(generator.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a photo of a fox number {index}")
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG not an image")
        (folder / "broken.txt").write_text("broken")
    return folder
