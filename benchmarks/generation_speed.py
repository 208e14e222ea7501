"""Text-to-image speed: seconds per image at 1, 2, 4 and 50 NFE, and what surrounds the transformer.

    python benchmarks/generation_speed.py                 # GPU: full-size configs; CPU: tiny ones
    python benchmarks/generation_speed.py --nfe 1,2 --families z_image --repeats 5

For each model and NFE it times whole ``TextToImage.generate`` calls (one image, prompts given
as precomputed embeddings, so the text encoder is not timed) and, inside them, every transformer
forward (forward hooks, synchronised on CUDA) and the VAE decode. Overhead is everything that is
not a transformer call (noise, sampler arithmetic, VAE decoding, conversion to PIL), as seconds
and as a percentage of the transformer time. Peak memory is the CUDA allocator's peak on a GPU
and the process's peak resident set size on the CPU (which only ever grows, so later rows
include the earlier ones).

On a GPU the models are the full-size Qwen-Image (20B) and Z-Image (6B) transformer and VAE
configurations with random weights in bfloat16 at 1024 x 1024 (about 41 GB and 12 GB of
weights). Without a GPU it runs the tiny test configurations (twinflow.testing) on the
CPU and says so: those numbers show the relative cost of the pieces, not real-model speed.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from twinflow.adapters import build_adapter
from twinflow.generation import FAMILIES, TextToImage

PRESETS = {1: "1nfe", 2: "2nfe", 4: "4nfe"}  # other NFE: the multi-step preset with that many steps
TEXT_TOKENS = 128  # prompt length of the random condition
PIPELINES = {"qwen_image": "QwenImagePipeline", "z_image": "ZImagePipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="qwen_image,z_image", help="comma-separated: qwen_image, z_image (tiny: also sd3, flux)")
    parser.add_argument("--nfe", default="1,2,4,50", help="comma-separated network evaluations per image")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--size", type=int, help="image side in pixels (default: 1024 full-size, 64 tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (the median is reported)")
    parser.add_argument("--tiny", action="store_true", help="tiny configurations even on a GPU")
    arguments = parser.parse_args(argv)
    arguments.families = [name.strip() for name in arguments.families.split(",") if name.strip()]
    arguments.nfe = [int(value) for value in arguments.nfe.split(",")]
    return arguments


def preset_for(nfe: int) -> str:
    return PRESETS.get(nfe, f"multi:steps={nfe}")


# -- models ------------------------------------------------------------------------------------


FULL_SIZE_TRANSFORMERS = {"qwen_image": "QwenImageTransformer2DModel", "z_image": "ZImageTransformer2DModel"}


def full_size_transformer(family: str, **overrides) -> torch.nn.Module:
    """The released model's transformer configuration (diffusers' defaults), random weights."""
    import diffusers

    if family not in FULL_SIZE_TRANSFORMERS:
        raise ValueError(f"no full-size configuration here for {family!r}; use --tiny")
    return getattr(diffusers, FULL_SIZE_TRANSFORMERS[family])(**overrides)


def full_size_parts(family: str, **transformer_overrides) -> dict:
    """The released models' transformer and VAE configurations (diffusers' defaults), random.

    ``transformer_overrides`` replace fields of the transformer's config (e.g. fewer blocks of
    the real width, ``num_layers=1``, for a check of the full-size code path on the CPU).
    """
    import diffusers

    transformer = full_size_transformer(family, **transformer_overrides)
    if family == "qwen_image":
        vae = diffusers.AutoencoderKLQwenImage()
    elif family == "z_image":
        vae = diffusers.AutoencoderKL(  # the Flux VAE that Z-Image uses
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )
    return {"transformer": transformer, "vae": vae, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
            "text_encoder": None, "tokenizer": None}


@contextmanager
def building_on(device: torch.device, dtype: torch.dtype):
    """Create parameters directly on ``device`` in ``dtype`` (a 20B model never sits in CPU memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    family: str, tiny: bool, device: torch.device, dtype: torch.dtype, transformer_overrides: dict | None = None
) -> TextToImage:
    """A ``TextToImage`` of random tiny or full-size parts, built on ``device`` in ``dtype``."""
    import diffusers

    from twinflow.testing import BUILDERS

    torch.manual_seed(0)
    with building_on(device, dtype):
        parts = BUILDERS[family](False) if tiny else full_size_parts(family, **(transformer_overrides or {}))
    parts = {name: part.to(device, dtype) if isinstance(part, torch.nn.Module) else part for name, part in parts.items()}
    pipeline = getattr(diffusers, PIPELINES[family])(**parts)
    pipeline.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 starts as a copy of emb: random weights anyway
        adapter = build_adapter(family, parts["transformer"])
    return TextToImage(pipeline, adapter, FAMILIES[family], device=device, dtype=dtype)


def text_width(family: str, transformer: torch.nn.Module) -> int:
    """The width of the prompt embeddings the transformer takes (its text encoder's hidden size)."""
    name = {"qwen_image": "joint_attention_dim", "z_image": "cap_feat_dim"}.get(family, "joint_attention_dim")
    return int(getattr(transformer.config, name))


def random_condition(model: TextToImage, tokens: int = TEXT_TOKENS) -> dict[str, torch.Tensor]:
    """One prompt's condition of ``tokens`` tokens with the transformer's text width."""
    config = model.adapter.transformer.config
    generator = torch.Generator().manual_seed(0)
    width = text_width(model.family.name, model.adapter.transformer)
    condition = {"prompt_embeds": torch.randn(1, tokens, width, generator=generator)}
    if model.family.name in ("qwen_image", "z_image"):
        condition["prompt_embeds_mask"] = torch.ones(1, tokens, dtype=torch.long)
    else:
        condition["pooled_prompt_embeds"] = torch.randn(1, config.pooled_projection_dim, generator=generator)
    return condition


# -- timing ------------------------------------------------------------------------------------


class Stopwatch:
    """Adds up the time spent inside a module's forward calls (hooks) and a VAE's decode."""

    def __init__(self, model: TextToImage):
        self.device = model.device
        self.transformer_seconds = self.vae_seconds = 0.0
        self.calls = 0
        self._started = 0.0
        transformer = model.adapter.transformer
        self._hooks = [
            transformer.register_forward_pre_hook(lambda module, args: self._start()),
            transformer.register_forward_hook(lambda module, args, output: self._stop()),
        ]
        self._vae = vae = model.pipeline.vae
        decode = vae.decode

        def timed_decode(*args, **kwargs):
            start = self._now()
            output = decode(*args, **kwargs)
            self.vae_seconds += self._now() - start
            return output

        vae.decode = timed_decode

    def remove(self) -> None:
        """Take the hooks off again (the transformer and the VAE are as before)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        vars(self._vae).pop("decode", None)  # the class's own decode again

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _start(self) -> None:
        self._started = self._now()

    def _stop(self) -> None:
        self.transformer_seconds += self._now() - self._started
        self.calls += 1

    def reset(self) -> None:
        self.transformer_seconds = self.vae_seconds = 0.0
        self.calls = 0


@dataclass
class Row:
    family: str
    nfe: int
    preset: str
    seconds: float  # per image, whole generate call
    transformer: float
    vae: float
    calls: int
    peak_bytes: int

    @property
    def overhead(self) -> float:
        return self.seconds - self.transformer

    def markdown(self) -> str:
        share = 100 * self.overhead / self.transformer if self.transformer > 0 else float("nan")
        return (
            f"| {self.family} | {self.nfe} | `{self.preset}` | {self.seconds:.4f} | {self.transformer:.4f} | "
            f"{self.vae:.4f} | {self.overhead:.4f} | {share:.1f}% | {self.peak_bytes / 2**20:,.0f} MiB |"
        )


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(model: TextToImage, watch: Stopwatch, nfe: int, size: int, repeats: int, condition: dict) -> Row:
    preset = preset_for(nfe)
    options = {"embeddings": condition, "preset": preset, "width": size, "height": size, "progress": False}
    model.generate(None, **options)  # warm-up (kernels, allocator)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    totals, transformer, vae = [], [], []
    for repeat in range(repeats):
        watch.reset()
        result = model.generate(None, seed=repeat, **options)
        totals.append(result.seconds)
        transformer.append(watch.transformer_seconds)
        vae.append(watch.vae_seconds)
        if watch.calls != result.network_calls:
            raise RuntimeError(f"{watch.calls} timed transformer calls, {result.network_calls} reported")
    order = sorted(range(repeats), key=lambda index: totals[index])
    median = order[len(order) // 2]  # one run's numbers, so the columns add up
    return Row(model.family.name, nfe, preset, totals[median], transformer[median], vae[median],
               result.network_calls, peak_memory(model.device))


def main(argv: list[str] | None = None) -> int:
    arguments = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    from twinflow.devices import resolve_device

    diffusers_logging.set_verbosity_error()

    device = resolve_device(arguments.device)
    tiny = arguments.tiny or device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = arguments.size or (64 if tiny else 1024)
    if device.type == "cpu":
        print(f"No GPU: tiny random configurations on the CPU ({torch.get_num_threads()} threads), float32, "
              f"{size}x{size}. These show the relative cost of the pieces, not the speed of real models.")
    else:
        kind = "tiny" if tiny else "full-size (random weights)"
        print(f"{torch.cuda.get_device_name(device)}: {kind} configurations, {dtype}, {size}x{size}.")
    print(f"One image per call, prompt as a precomputed {TEXT_TOKENS}-token embedding (text encoder not timed); "
          f"median of {arguments.repeats} calls after one warm-up. torch {torch.__version__}.\n")
    rows = []
    for family in arguments.families:
        model = build_model(family, tiny, device, dtype)
        watch = Stopwatch(model)
        condition = random_condition(model)
        for nfe in arguments.nfe:
            row = measure(model, watch, nfe, size, arguments.repeats, condition)
            rows.append(row)
            print(f"  {family} {nfe} NFE: {row.seconds:.4f} s per image", file=sys.stderr)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    memory = "peak CUDA memory" if device.type == "cuda" else "peak RSS (process)"
    print(f"| model | NFE | preset | s / image | transformer s | VAE decode s | overhead s | overhead / transformer | {memory} |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
