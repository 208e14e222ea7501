"""Tiny random pipeline folders, built offline, for tests, benchmarks and examples.

Each builder writes what ``DiffusionPipeline.save_pretrained`` writes for a real model of the
family, at toy size and with random weights: a tiny transformer, VAE, scheduler config and,
optionally, tiny text encoder(s) with a byte-level BPE tokenizer trained in code (nothing is
downloaded). ``extra_weights=True`` also stores the adapter's second time embedding in
``transformer/``, as the released TwinFlow checkpoints do, randomly perturbed so that it differs
from a copy of the first.

Sizes: every VAE here halves the image side and every transformer groups 2 x 2 latent pixels
into a token, so image sides must be multiples of 4 (``TINY_SIZE_MULTIPLE``). The tiny Flux
folder has no text encoders (CLIP + T5); use it with precomputed embeddings.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["BUILDERS", "TINY_SIZE_MULTIPLE", "build_tiny_folder", "tiny_tokenizer"]

TINY_SIZE_MULTIPLE = 4  # VAE factor 2 x patch size 2
VOCAB = 280  # 256 bytes, specials, a few merges
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "a photo of a red fox in the snow", "a watercolor painting of a lighthouse at dusk",
    "an astronaut riding a horse", "a bowl of fruit on a wooden table", "the quick brown fox",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(model_max_length: int = 512) -> Any:
    """A byte-level BPE tokenizer trained in code on a few sentences (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        model_max_length=model_max_length,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        scaling_factor=1.5, shift_factor=0.1,
    )


def _z_image(text_encoder: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    parts = {
        "transformer": ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[512, 32, 32],
        ),
        "vae": _vae(4),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": None,
        "tokenizer": None,
    }
    if text_encoder:
        from transformers import Qwen3Config, Qwen3Model

        parts["text_encoder"] = Qwen3Model(Qwen3Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        ))
        parts["tokenizer"] = tiny_tokenizer(512)
    return parts


def _qwen_image(text_encoder: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    parts = {
        "transformer": QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
        ),
        "vae": AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.1, -0.1, 0.2, 0.0], latents_std=[1.5, 2.0, 1.0, 0.5],
        ),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": None,
        "tokenizer": None,
    }
    if text_encoder:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 2, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            },
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
            vocab_size=VOCAB, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
            vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4,
        )
        parts["text_encoder"] = Qwen2_5_VLForConditionalGeneration(config)
        parts["tokenizer"] = tiny_tokenizer(2048)
    return parts


def _sd3(text_encoder: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    parts = {
        "transformer": SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=32,
        ),
        "vae": _vae(4),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        # T5 left out: the pipeline fills its part of the prompt embedding with zeros.
        "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
        "text_encoder_3": None, "tokenizer_3": None,
    }
    if text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        for suffix, seed in (("", 0), ("_2", 1)):
            torch.manual_seed(seed)
            parts[f"text_encoder{suffix}"] = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=40, projection_dim=16,
                bos_token_id=0, eos_token_id=2, pad_token_id=0,
            ))
            parts[f"tokenizer{suffix}"] = tiny_tokenizer(40)
    return parts


def _flux(text_encoder: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if text_encoder:
        raise NotImplementedError("the tiny Flux folder has no text encoders; use precomputed embeddings")
    return {
        "transformer": FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
        ),
        "vae": _vae(4),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
    }


BUILDERS = {"z_image": _z_image, "qwen_image": _qwen_image, "sd3": _sd3, "flux": _flux}
PIPELINES = {"z_image": "ZImagePipeline", "qwen_image": "QwenImagePipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def build_tiny_folder(
    folder: str | Path, family: str, *, text_encoder: bool = True, extra_weights: bool = False, seed: int = 0
) -> Path:
    """Write a tiny random pipeline folder of ``family`` (``z_image``, ``qwen_image``, ``sd3``,
    ``flux``) to ``folder``; returns it. ``text_encoder=False`` leaves the text encoder(s) out
    (``model_index.json`` lists them as null). See the module notes."""
    import diffusers

    from twinflow.adapters import build_adapter

    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for {family!r}; choose one of {sorted(BUILDERS)}")
    torch.manual_seed(seed)
    parts = BUILDERS[family](text_encoder)
    pipeline = getattr(diffusers, PIPELINES[family])(**parts)
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    if extra_weights:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the copy-initialised emb_2, perturbed below
            adapter = build_adapter(family, parts["transformer"])
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for parameter in adapter.second_embedding.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        adapter.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder
