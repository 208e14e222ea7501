"""Tiny random pipeline folders, built offline, for tests, benchmarks and examples.

Public: ``from twinflow.testing import build_tiny_folder`` gives a folder ``twinflow generate``,
``cache``, training and export accept, in seconds on a CPU (needs the ``diffusers`` extra).

Each builder writes what ``DiffusionPipeline.save_pretrained`` writes for a real model of the
family, at toy size and with random weights: a tiny transformer, VAE, scheduler config and,
optionally, tiny text encoder(s) with a byte-level BPE tokenizer trained in code (nothing is
downloaded). ``extra_weights=True`` also stores the adapter's second time embedding in
``transformer/``, as the released TwinFlow checkpoints do, randomly perturbed so that it differs
from a copy of the first.

Sizes: every VAE here halves the image side and every transformer groups 2 x 2 latent pixels
into a token (Sana: one latent pixel per token, as the released model), so image sides must be
multiples of 4 (``TINY_SIZE_MULTIPLE``). The tiny Flux
folder has no text encoders (CLIP + T5); use it with precomputed embeddings.

:func:`build_full_width_folder` is the other kind: the released transformer's widths and module
names (Qwen-Image 20B, Z-Image 6B, SD3.5 Medium) with one or two blocks, bf16 weights, and tiny
parts around it; for tests that the shipped large-model recipes run end to end.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BUILDERS", "FULL_WIDTH_LAYERS", "initialised", "FULL_WIDTH_SIZE_MULTIPLE", "SD3_POOLED_WIDTH", "TEXT_WIDTHS", "TINY_SIZE_MULTIPLE",
    "build_full_width_folder", "build_tiny_folder", "tiny_tokenizer",
]

TINY_SIZE_MULTIPLE = 4  # VAE factor 2 x patch size 2
VOCAB = 280  # 256 bytes, specials, a few merges
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen2.5-VL's vision tokens, in the order of its config's vision_start/end, image and video ids."""
CORPUS = [
    "a photo of a red fox in the snow", "a watercolor painting of a lighthouse at dusk",
    "an astronaut riding a horse", "a bowl of fruit on a wooden table", "the quick brown fox",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(
    model_max_length: int = 512, corpus: list[str] | None = None, vocab_size: int = VOCAB, specials: tuple[str, ...] = ()
) -> Any:
    """A byte-level BPE tokenizer trained in code on a few sentences (any text encodes); ``corpus``
    and ``vocab_size`` replace the default sentences and size (a text encoder's vocabulary must
    hold ``vocab_size`` tokens); ``specials`` are more special tokens (after the default ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIALS, *specials], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS if corpus is None else corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        model_max_length=model_max_length,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def initialised(module: Any) -> Any:
    """``module`` with every ``*pad_token`` parameter zeroed, as diffusers 0.40+ initialises
    Z-Image's; earlier releases leave them ``torch.empty`` (whatever memory held), so two seeded
    builds would differ. Returns ``module``."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("pad_token"):
                parameter.zero_()
    return module


def _vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        scaling_factor=1.5, shift_factor=0.1,
    )


def _with_text_encoder(
    parts: dict[str, Any], text_encoder: bool, build: Any, model_max_length: int, specials: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``parts`` with a tiny tokenizer of ``model_max_length`` tokens (``specials`` added) and
    ``text_encoder`` = ``build(tokenizer)``, built last, so the seeded weights before it do not
    change (the tokenizer draws no torch random numbers); or both None."""
    tokenizer = tiny_tokenizer(model_max_length, specials=specials) if text_encoder else None
    parts["text_encoder"] = build(tokenizer) if text_encoder else None
    parts["tokenizer"] = tokenizer
    return parts


def _z_image(text_encoder: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    parts = {
        "transformer": initialised(ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[512, 32, 32],
        )),
        "vae": _vae(4),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }

    def build(tokenizer):
        from transformers import Qwen3Config, Qwen3Model

        return Qwen3Model(Qwen3Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        ))

    return _with_text_encoder(parts, text_encoder, build, 512)


def _qwen_image(text_encoder: bool, *, vision_tokens: bool = False, zero_cond_t: bool = False) -> dict[str, Any]:
    """Qwen-Image's parts; ``vision_tokens`` gives the tokenizer Qwen2.5-VL's vision tokens (an edit
    pipeline puts images into its prompts), ``zero_cond_t`` the Edit-2511 transformer."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    parts = {
        "transformer": QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
        ),
        "vae": AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.1, -0.1, 0.2, 0.0], latents_std=[1.5, 2.0, 1.0, 0.5],
        ),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }
    def build(tokenizer):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        # Without vision tokens the image ids are unused; with them they must be the tokenizer's.
        ids = [VOCAB - k for k in (3, 4, 1, 2)]
        if vision_tokens:
            ids = [tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS]

        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 2, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            },
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
            vocab_size=VOCAB, vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2],
            video_token_id=ids[3],
        )
        return Qwen2_5_VLForConditionalGeneration(config)

    return _with_text_encoder(parts, text_encoder, build, 2048, VISION_TOKENS if vision_tokens else ())


def _qwen_image_edit(text_encoder: bool, zero_cond_t: bool = False) -> dict[str, Any]:
    """An edit pipeline's parts: Qwen-Image's, with vision tokens, and ``processor`` (written by
    :func:`_save_processor`, as the released folders hold it)."""
    return {**_qwen_image(text_encoder, vision_tokens=True, zero_cond_t=zero_cond_t), "processor": None}


def _save_processor(folder: Path, tokenizer: Any) -> None:
    """``processor/`` as the released edit folders have it (the image processor's
    ``preprocessor_config.json`` and the tokenizer files), listed in ``model_index.json`` as
    transformers' ``Qwen2VLProcessor``. The image processor keeps transformers' defaults
    (patch 14, merge 2: one token per 28 x 28 pixels; at least 56 x 56 pixels)."""
    import json

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil().save_pretrained(folder / "processor")
    tokenizer.save_pretrained(folder / "processor")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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


def _sana(text_encoder: bool) -> dict[str, Any]:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    parts = {
        "transformer": SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=8, patch_size=1,
        ),
        "vae": AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "ResBlock"),
            decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm",
            scaling_factor=0.4,
        ),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }

    def build(tokenizer):
        from transformers import Gemma2Config, Gemma2Model

        return Gemma2Model(Gemma2Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=0,
        ))

    return _with_text_encoder(parts, text_encoder, build, 1024)


BUILDERS = {
    "z_image": _z_image, "qwen_image": _qwen_image, "sd3": _sd3, "flux": _flux, "sana": _sana,
    "qwen_image_edit": _qwen_image_edit, "qwen_image_edit_plus": _qwen_image_edit,
    "qwen_image_edit_2511": lambda text_encoder: _qwen_image_edit(text_encoder, zero_cond_t=True),
}
PIPELINES = {
    "z_image": "ZImagePipeline", "qwen_image": "QwenImagePipeline", "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline", "sana": "SanaPipeline", "qwen_image_edit": "QwenImageEditPipeline",
    "qwen_image_edit_plus": "QwenImageEditPlusPipeline", "qwen_image_edit_2511": "QwenImageEditPlusPipeline",
}
ADAPTER_FAMILIES = {"qwen_image_edit": "qwen_image", "qwen_image_edit_plus": "qwen_image", "qwen_image_edit_2511": "qwen_image"}
"""The adapter family of the folder kinds that are not families themselves (the edit pipelines)."""


def build_tiny_folder(
    folder: str | Path, family: str, *, text_encoder: bool = True, extra_weights: bool = False, seed: int = 0
) -> Path:
    """Write a tiny random pipeline folder of ``family`` (``z_image``, ``qwen_image``, ``sd3``,
    ``flux``, ``sana``; or an edit pipeline: ``qwen_image_edit``, ``qwen_image_edit_plus``,
    ``qwen_image_edit_2511``, Edit-Plus with ``zero_cond_t``) to ``folder``; returns it.
    ``text_encoder=False`` leaves the text encoder(s) out (``model_index.json`` lists them as
    null). See the module notes."""
    import diffusers

    from twinflow.adapters import build_adapter

    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for {family!r}; choose one of {sorted(BUILDERS)}")
    torch.manual_seed(seed)
    parts = BUILDERS[family](text_encoder)
    pipeline = getattr(diffusers, PIPELINES[family])(**parts)
    folder = Path(folder)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # "processor=None cannot be saved": written below
    try:
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    if "processor" in parts and text_encoder:
        _save_processor(folder, parts["tokenizer"])
    if extra_weights:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the copy-initialised emb_2, perturbed below
            adapter = build_adapter(ADAPTER_FAMILIES.get(family, family), parts["transformer"])
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for parameter in adapter.second_embedding.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        adapter.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


# ---- full width: the released widths and module names, few blocks ---------------------------

FULL_WIDTH_SIZE_MULTIPLE = 4  # the full-width folders' tiny VAEs halve the side too; patch size 2
SD35_MEDIUM = {
    # stabilityai/stable-diffusion-3.5-medium, transformer/config.json (diffusers' own defaults
    # are SD3 Medium's 18 x 1152; Qwen-Image's and Z-Image's defaults are the released models')
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
FULL_WIDTH_LAYERS = {"qwen_image": 2, "z_image": 1, "sd3": 2}
"""Blocks kept by :func:`build_full_width_folder`: two for the MMDiTs, so that a first block and
the different last one (Qwen-Image: text outputs discarded; SD3: ``context_pre_only``) are both
there; Z-Image's one main block plus one noise and one context refiner block."""
TEXT_WIDTHS = {"qwen_image": 3584, "z_image": 2560, "sd3": 4096}  # prompt_embeds (B, L, width)
SD3_POOLED_WIDTH = 2048  # pooled_prompt_embeds (B, 2048): CLIP-L 768 + CLIP-G 1280
SD35_POS_EMBED_MAX_SIZE = 32
"""SD3's positional table is a buffer of pos_embed_max_size**2 x 1536 (0.9 GB at the released 384),
not a width: 32 keeps its module and key names and takes latents up to 64 x 64."""


def _full_width_transformer(family: str, layers: int) -> Any:
    import diffusers

    if family == "qwen_image":  # the defaults are Qwen/Qwen-Image's: 24 x 128 heads, text 3584, 64 in, 16 out
        return diffusers.QwenImageTransformer2DModel(num_layers=layers)
    if family == "z_image":  # the defaults are Tongyi-MAI/Z-Image's (dim 3840, 30 heads, text 2560) but
        # for the RoPE lengths: the released config has 1536 caption positions (prompts of 1024 tokens)
        return initialised(diffusers.ZImageTransformer2DModel(n_layers=layers, n_refiner_layers=1, axes_lens=[1536, 512, 512]))
    if family == "sd3":
        config = dict(SD35_MEDIUM, num_layers=layers, pos_embed_max_size=SD35_POS_EMBED_MAX_SIZE)
        # the released blocks 0-12 have a second attention, the last block none (context_pre_only)
        config["dual_attention_layers"] = tuple(index for index in SD35_MEDIUM["dual_attention_layers"] if index < layers - 1)
        return diffusers.SD3Transformer2DModel(**config)
    raise ValueError(f"no full-width builder for {family!r}; choose one of {sorted(FULL_WIDTH_LAYERS)}")


def _full_width_vae(family: str) -> Any:
    """A tiny VAE (side halved) with the family's real 16 latent channels and normalisation."""
    if family == "qwen_image":
        from diffusers import AutoencoderKLQwenImage

        # latents_mean / latents_std: the class defaults, Qwen-Image's (Wan 2.1's) statistics
        return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    from diffusers import AutoencoderKL

    # SD3.5's VAE, and Flux's (which Z-Image uses): scaling and shift factors as released
    scaling, shift = {"sd3": (1.5305, 0.0609), "z_image": (0.3611, 0.1159)}[family]
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=family == "sd3", use_post_quant_conv=family == "sd3",
    )


def build_full_width_folder(
    folder: str | Path, family: str, *, layers: int | None = None, seed: int = 0, max_shard_size: str = "1GB"
) -> Path:
    """A pipeline folder whose transformer has the released model's widths and module names but
    only ``layers`` blocks (:data:`FULL_WIDTH_LAYERS` by default), random weights stored in
    bfloat16 (``save_pretrained`` after ``.to(torch.bfloat16)``, as released checkpoints are, in
    shards of ``max_shard_size`` with their index file), a tiny VAE with the family's 16 latent
    channels (side halved: image sides multiples of :data:`FULL_WIDTH_SIZE_MULTIPLE`), a default
    flow-matching scheduler config and no text encoders (generate from precomputed embeddings of
    width :data:`TEXT_WIDTHS`). Families: ``qwen_image`` (2 blocks: ~0.75B parameters),
    ``z_image`` (1 + 1 + 1 blocks: ~0.6B), ``sd3`` (SD3.5 Medium, 2 blocks: ~0.2B); returns ``folder``.

    The transformer is initialised in bfloat16 (torch's default dtype switched for its
    construction), which halves the memory of building it.
    """
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family not in FULL_WIDTH_LAYERS:
        raise ValueError(f"no full-width builder for {family!r}; choose one of {sorted(FULL_WIDTH_LAYERS)}")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        transformer = _full_width_transformer(family, layers or FULL_WIDTH_LAYERS[family])
    finally:
        torch.set_default_dtype(default)
    transformer = transformer.to(torch.bfloat16)
    parts = {"transformer": transformer, "vae": _full_width_vae(family), "scheduler": FlowMatchEulerDiscreteScheduler()}
    parts |= {part: None for part in {
        "qwen_image": ("text_encoder", "tokenizer"), "z_image": ("text_encoder", "tokenizer"),
        "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
    }[family]}
    pipeline = getattr(diffusers, PIPELINES[family])(**parts)
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return folder
