"""Command line: ``twinflow train | sample | eval | generate | encode | cache | export``."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import numpy as np
import yaml


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's rule for expected failures: one line naming the flag, exit code 2
    (argparse's own error prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="twinflow", description="TwinFlow: one-step generators from flow models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (
        _add_train_command, _add_sample_command, _add_eval_command, _add_generate_command, _add_cache_command,
        _add_export_command, _add_encode_command,
    ):
        add_command(commands)
    return parser


def _add_train_command(commands) -> None:
    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", type=Path, help="YAML config (see configs/); optional with --resume")
    train.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics, grids")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.batch_size=32 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    train.add_argument("--allow-change", dest="allow_changes", action="append", default=[], metavar="KEY",
                       help="--resume: let the config differ from the checkpoint's at KEY (a key or a section, "
                            "e.g. training.learning_rate or phases; repeatable); architecture keys never may. "
                            "Allowed changes are printed and logged in config_changes.jsonl")
    train.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the config)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config and print the per-process plan and memory estimate; builds the model "
                            "on the meta device, reads no weights, writes nothing")
    train.add_argument("--world-size", type=_positive, metavar="N",
                       help="--dry-run: the number of processes to plan for (default: WORLD_SIZE, else 1)")
    train.add_argument("--latent-size", metavar="HxW",
                       help="--dry-run: latent size (height x width) of the activation estimate, e.g. 128x128 "
                            "(default: the latent cache's largest, else the family's default)")


def _add_sample_command(commands) -> None:
    sample = commands.add_parser("sample", help="sample images from a checkpoint")
    sample.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder or a run folder (newest)")
    sample.add_argument("--preset", default="1nfe", help="sampler preset: 1nfe, 2nfe, 4nfe, any, multi")
    sample.add_argument("--sampler", dest="sampler_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sampler field, e.g. --sampler steps=8 (repeatable)")
    sample.add_argument("--per-class", type=_positive, default=10, help="images per class")
    sample.add_argument("--labels", type=_labels, help="comma-separated class labels instead of --per-class, e.g. 3,3,7")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=_positive, default=500)
    sample.add_argument("--grid", type=Path, help="write a PNG grid (one row per class with --per-class)")
    sample.add_argument("--npz", type=Path, help="write images (float32 N x C x H x W in [0, 1]) and labels (int64)")
    sample.add_argument("--ema", action="store_true", help="use the EMA teacher's weights")
    sample.add_argument("--device", default="auto")
    sample.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")


def _add_eval_command(commands) -> None:
    evaluate = commands.add_parser("eval", help="score sampler presets against real data (accuracy, Fréchet distance, precision/recall)")
    evaluate.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder or a run folder (newest)")
    evaluate.add_argument("--presets", default="1nfe,2nfe,4nfe,multi", help="comma-separated sampler presets or specs, e.g. 1nfe,multi:steps=50")
    evaluate.add_argument("--num", type=_positive, default=1000, help="generated images per preset, balanced over the classes")
    evaluate.add_argument("--classifier", type=Path,
                          help="a saved digit classifier (folder with classifier.safetensors + classifier.json); "
                               "default: the cached one for the checkpoint's data, trained once")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling noise and subset seed")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--ema", action="store_true", help="use the EMA teacher's weights")
    evaluate.add_argument("--k", type=_positive, default=3, help="neighbours for the precision/recall manifolds")
    evaluate.add_argument("--batch-size", type=_positive, default=500)
    evaluate.add_argument("--inception", action="store_true",
                          help="add an Inception FID when torch-fidelity and its weights are present (never downloads)")
    evaluate.add_argument("--out", type=Path, help="write the report as JSON")


def _add_generate_command(commands) -> None:
    generate = commands.add_parser("generate", help="text-to-image (or image editing) with a TwinFlow diffusers model folder (PNG files)")
    generate.add_argument("--model", required=True, help="a diffusers pipeline folder (Qwen-Image, Qwen-Image-Edit, Z-Image, SD3, Flux, Sana), or a hub id (owner/name) fetched once when online")
    _add_prompt_arguments(generate)
    generate.add_argument("--lora", type=Path, metavar="DIR", help="a LoRA export (twinflow export of a LoRA run), or a diffusers-format LoRA file, to apply to --model")
    generate.add_argument("--extra-weights", type=Path, metavar="FILE",
                          help="a safetensors file of TwinFlow's second time embedding (a patch file) for a plain base --model")
    generate.add_argument("--gguf", type=Path, metavar="FILE",
                          help="quantized transformer weights (a GGUF file, diffusers' GGUF backend; pip install gguf) for --model's transformer")
    generate.add_argument("--embeddings", type=Path, metavar="FILE", help="precomputed prompt embeddings (twinflow encode); the text encoder is not loaded")
    generate.add_argument("--preset", default="2nfe", help="sampler preset or spec: 1nfe, 2nfe, 4nfe, any, multi, multi:steps=50")
    generate.add_argument("--sampler", dest="sampler_overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a sampler field, e.g. --sampler stochastic_ratio=0.5 (repeatable)")
    generate.add_argument("--size", type=_image_size, metavar="WIDTHxHEIGHT",
                          help="image size, e.g. 1024x768 (default 1024x1024; an edit: the pipeline's size for its source images)")
    generate.add_argument("--image", dest="images", type=Path, action="append", default=[], metavar="FILE",
                          help="an edit pipeline's source image (repeatable for Edit-Plus: Picture 1, 2, ...); every prompt edits them")
    generate.add_argument("--source-area", type=_positive, metavar="PIXELS",
                          help="an edit's source pixel count, each source keeping its aspect ratio (default 1048576 = 1024x1024, the pipelines')")
    generate.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    generate.add_argument("--batch-size", type=_positive, default=1, help="images per transformer batch")
    generate.add_argument("--out", type=Path, required=True, help="folder for the PNG files (<index>_<seed>.png)")
    generate.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance scale w of F_u + w (F_c - F_u), as in diffusers (0: off, as TwinFlow models are meant to be used)")
    _add_device_arguments(generate)
    generate.add_argument("--offload", nargs="?", const="model", choices=["model", "group", "sequential"],
                          help="CPU offload (CUDA only), least to most memory saved: model (each model moves to the GPU "
                               "while it runs; the default of a bare --offload), group (the transformer's blocks one "
                               "at a time), sequential (every layer on its own; slowest)")


def _add_cache_command(commands) -> None:
    cache = commands.add_parser("cache", help="encode captioned images once into a latent cache for text-to-image training")
    cache.add_argument("--model", required=True, help="a diffusers pipeline folder (its VAE and text encoder are used)")
    cache.add_argument("--data", type=Path, required=True, help="a folder of images with same-name .txt captions, or parquet file(s)")
    cache.add_argument("--source", choices=["folder", "parquet"], default="folder")
    cache.add_argument("--size", type=_positive, default=1024, help="image side (square crop), or the pixel budget side with --buckets")
    cache.add_argument("--buckets", action="store_true", help="aspect-ratio buckets instead of square centre crops")
    cache.add_argument("--edit-source", dest="edit_sources", action="append", default=[], metavar="DIR_OR_COLUMN",
                       help="edit triplets (an edit pipeline): a folder of source images named as the targets in --data "
                            "(folder source), or the column of their bytes (parquet); repeatable for Picture 1, 2, ...")
    cache.add_argument("--on-error", choices=["skip", "error"], default="skip",
                       help="corrupt images and missing captions: count, report and skip them, or stop at the first")
    cache.add_argument("--out", type=Path, required=True, help="the cache folder (an interrupted run resumes)")
    cache.add_argument("--batch-size", type=_positive, default=8, help="images per encoder call")
    cache.add_argument("--shard-size", type=_positive, default=1024, help="items per safetensors shard")
    cache.add_argument("--overwrite", action="store_true", help="replace an existing cache made from other data or settings")
    _add_token_limit(cache)
    _add_device_arguments(cache)


def _add_export_command(commands) -> None:
    export = commands.add_parser("export", help="write a trained text-to-image checkpoint as a diffusers folder (or a LoRA file)")
    export.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder or a run folder (newest)")
    export.add_argument("--out", type=Path, required=True, help="the new folder to write (must not exist)")
    export.add_argument("--ema", action="store_true", help="export the EMA teacher's weights")
    export.add_argument("--pipeline", type=Path, help="the diffusers pipeline folder whose VAE and text encoder join the "
                                                       "trained transformer (default: the one model.path lies in)")
    export.add_argument("--merge-lora", action="store_true", help="merge a LoRA run into the base weights: a full folder")
    export.add_argument("--link", action="store_true", help="hard-link the pipeline's other parts instead of copying them")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the written transformer weights")
    export.add_argument("--format", dest="export_format", choices=["diffusers", "comfyui"], default="diffusers",
                        help="diffusers folders / LoRA files, or the patch (and LoRA) files of ComfyUI's TwinFlow nodes")


def _add_encode_command(commands) -> None:
    encode = commands.add_parser("encode", help="encode prompts once with the text encoder, for generate --embeddings")
    encode.add_argument("--model", required=True, help="a diffusers pipeline folder with its text encoder, or a hub id")
    _add_prompt_arguments(encode)
    encode.add_argument("--out", type=Path, required=True, help="the embeddings file, F.safetensors")
    encode.add_argument("--batch-size", type=_positive, default=8, help="prompts per text-encoder batch")
    _add_device_arguments(encode)


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", type=Path, metavar="FILE", help="a text file with one prompt per line (blank lines skipped)")
    _add_token_limit(parser)


def _add_token_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-sequence-length", type=_positive, metavar="N",
                        help="prompt tokens (T5's for SD3 and Flux); default: the family's, else the pipeline's. "
                             "Use the value the model's training cache used")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")


MAX_PIXELS = 4096 * 4096
"""Largest image ``generate`` makes: beyond the sizes any supported family was trained at, and a
guard against a typo that would allocate tens of gigabytes."""


def _image_size(text: str) -> tuple[int, int]:
    width, separator, height = text.lower().partition("x")
    if not separator or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT, e.g. 1024x768, got {text!r}")
    width, height = int(width), int(height)
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise argparse.ArgumentTypeError(
            f"size {width}x{height} must have positive sides and at most {MAX_PIXELS:,} pixels (4096x4096)"
        )
    return width, height


def _labels(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated class numbers, e.g. 3,3,7, got {text!r}")
    return [int(part) for part in parts]


def read_prompts(arguments: argparse.Namespace) -> list[str]:
    """The --prompt values, then the lines of --prompt-file."""
    prompts = list(arguments.prompts)
    if arguments.prompt_file is not None:
        if not arguments.prompt_file.is_file():
            raise FileNotFoundError(f"--prompt-file {arguments.prompt_file} does not exist")
        lines = arguments.prompt_file.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def parse_assignments(items: list[str], flag: str) -> dict:
    values = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"{flag} {item!r} must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"{flag} {item!r}: the value is not a number, word or [list]") from None
    return values


def command_train(arguments: argparse.Namespace) -> None:
    from twinflow.train.config import load_config
    from twinflow.train.loop import train

    config_path = arguments.config
    if arguments.resume and config_path is None:
        config_path = arguments.out / "config.yaml"
    if config_path is None:
        raise ValueError("train needs --config (or --resume with an existing --out)")
    overrides = list(arguments.overrides)
    if arguments.device:
        overrides.append(f"device={arguments.device}")
    if arguments.dry_run:
        _dry_run(config_path, overrides, arguments)
        return
    if arguments.world_size is not None or arguments.latent_size is not None:
        raise ValueError("--world-size and --latent-size only apply with --dry-run")
    if arguments.allow_changes and not arguments.resume:
        raise ValueError("--allow-change only applies with --resume")
    config = load_config(config_path, overrides)
    result = train(config, arguments.out, resume=arguments.resume, allow_changes=tuple(arguments.allow_changes))
    if result.rank != 0:  # under torchrun, one process reports
        return
    print(f"trained {result.steps} steps ({result.parameters:,} parameters); checkpoint: {result.final_checkpoint}")
    for preset, grid in result.grids.items():
        print(f"  {preset} grid: {grid}")


def _dry_run(config_path: Path, overrides: list[str], arguments: argparse.Namespace) -> None:
    """``train --dry-run``: the pre-flight plan of :mod:`twinflow.train.preflight`; nothing is
    written, and every problem is one ``error:`` line with exit code 2 (:func:`main`)."""
    from twinflow.train.config import load_config
    from twinflow.train.preflight import default_world_size, parse_latent_size, preflight
    from twinflow.train.preflight_report import render

    config = load_config(config_path, overrides)
    world_size = arguments.world_size if arguments.world_size is not None else default_world_size()
    latent_size = parse_latent_size(arguments.latent_size) if arguments.latent_size else None
    plan = preflight(config, world_size, latent_size)
    print(f"config: {config_path}")
    print(render(plan))


def command_sample(arguments: argparse.Namespace) -> None:
    from twinflow.eval.grid import save_grid
    from twinflow.pipeline import load

    from twinflow.sampler import resolve_sampler

    overrides = parse_assignments(arguments.sampler_overrides, "--sampler")
    resolve_sampler(arguments.preset, **overrides)  # a typo is named before any weight is read
    generator = load(arguments.checkpoint, device=arguments.device, use_ema=arguments.ema, precision=arguments.precision)
    labels = arguments.labels
    samples = generator.sample(
        labels=labels, per_class=None if labels else arguments.per_class, preset=arguments.preset,
        seed=arguments.seed, batch_size=arguments.batch_size, progress=True, **overrides,
    )
    count = samples.images.shape[0]
    print(f"sampled {count} images with {samples.network_calls} network call(s) each "
          f"in {samples.seconds:.2f} s ({count / max(samples.seconds, 1e-9):.1f} images/s)")
    if arguments.grid:
        rows = generator.num_classes if labels is None else max(1, int(round(count**0.5)))
        save_grid(samples.images, arguments.grid, rows=rows)
        print(f"grid: {arguments.grid}")
    if arguments.npz:
        arguments.npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(arguments.npz, images=samples.images.numpy().astype(np.float32), labels=samples.labels.numpy().astype(np.int64))
        print(f"npz: {arguments.npz}")


def command_eval(arguments: argparse.Namespace) -> None:
    import json

    from twinflow.eval.evaluate import evaluate_checkpoint

    from twinflow.sampler import split_specs

    presets = split_specs(arguments.presets)
    if arguments.classifier is not None and not arguments.classifier.exists():
        raise FileNotFoundError(f"--classifier {arguments.classifier} does not exist")
    report = evaluate_checkpoint(
        arguments.checkpoint, presets=presets, num=arguments.num, classifier=arguments.classifier,
        seed=arguments.seed, device=arguments.device, use_ema=arguments.ema, k=arguments.k,
        inception=arguments.inception, batch_size=arguments.batch_size, log=print,
    )
    print(report.to_markdown())
    if arguments.out:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"report: {arguments.out}")


def command_generate(arguments: argparse.Namespace) -> None:
    from twinflow.devices import resolve_device, resolve_dtype
    from twinflow.generation import TextToImage, save_images
    from twinflow.generation.loading import check_image_size
    from twinflow.sampler import resolve_sampler

    prompts = read_prompts(arguments)
    if not prompts and arguments.embeddings is None:
        raise ValueError("give --prompt, --prompt-file or --embeddings")
    # What can be checked without the model is checked before it is loaded (minutes for a big one).
    overrides = parse_assignments(arguments.sampler_overrides, "--sampler")
    resolve_sampler(arguments.preset, **overrides)
    if arguments.out.exists() and not arguments.out.is_dir():
        raise FileExistsError(f"--out {arguments.out} is a file; give a folder for the PNG files")
    if arguments.embeddings is not None and not arguments.embeddings.is_file():
        raise FileNotFoundError(f"--embeddings {arguments.embeddings} does not exist")
    for flag, path in (("--extra-weights", arguments.extra_weights), ("--gguf", arguments.gguf)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    resolve_dtype(arguments.dtype, resolve_device(arguments.device))
    for image in arguments.images:
        if not image.is_file():
            raise FileNotFoundError(f"--image {image} does not exist")
    if arguments.size is not None:
        check_image_size(arguments.model, *arguments.size, transformer_weights=arguments.gguf is None)
    pipe = TextToImage.from_pretrained(
        arguments.model, device=arguments.device, dtype=arguments.dtype, offload=arguments.offload,
        load_text_encoder=arguments.embeddings is None, lora=arguments.lora, extra_weights=arguments.extra_weights, gguf=arguments.gguf,
        max_sequence_length=arguments.max_sequence_length,
    )
    width, height = arguments.size or (None, None)
    result = pipe.generate(
        prompts or None, embeddings=arguments.embeddings, images=[str(image) for image in arguments.images] or None,
        preset=arguments.preset, width=width, height=height, seed=arguments.seed, batch_size=arguments.batch_size,
        guidance_scale=arguments.guidance_scale, progress=True, source_area=arguments.source_area, **overrides,
    )
    paths = save_images(result, arguments.out)
    width, height = result.settings["width"], result.settings["height"]
    print(f"wrote {len(paths)} image(s) of {width}x{height} to {arguments.out} "
          f"({result.seconds_per_image:.2f} s per image, {result.network_calls} network call(s) each)")


def command_cache(arguments: argparse.Namespace) -> None:
    from twinflow.data import CaptionedDataConfig
    from twinflow.train.prepare import cache_from_pipeline

    sources = {"source_roots" if arguments.source == "folder" else "source_columns": tuple(arguments.edit_sources)}
    data = CaptionedDataConfig(
        source=arguments.source, root=str(arguments.data), image_size=arguments.size, buckets=arguments.buckets,
        on_error=arguments.on_error, **sources,
    )
    cache, dataset = cache_from_pipeline(
        arguments.model, data, arguments.out, device=arguments.device, dtype=arguments.dtype,
        batch_size=arguments.batch_size, shard_size=arguments.shard_size, overwrite=arguments.overwrite,
        max_sequence_length=arguments.max_sequence_length,
    )
    shapes = ", ".join("x".join(str(side) for side in shape) for shape in cache.buckets)
    print(f"cached {len(cache)} item(s) in {arguments.out} (latent shapes {shapes})")
    if dataset.report.total:
        print(f"skipped: {dataset.report.summary()}")


def command_export(arguments: argparse.Namespace) -> None:
    from twinflow.adapters import LORA_WEIGHTS_FILE
    from twinflow.train.export import export_diffusers

    out = export_diffusers(
        arguments.checkpoint, arguments.out, use_ema=arguments.ema, pipeline=arguments.pipeline,
        merge_lora=arguments.merge_lora, link_parts=arguments.link, dtype=arguments.dtype,
        export_format=arguments.export_format,
    )
    if arguments.export_format == "comfyui":
        files = sorted(str(path.relative_to(out)) for path in out.rglob("*.safetensors"))
        print(f"ComfyUI files in {out}: {files} (copy them into ComfyUI/models/; use the TwinFlow Model Patcher "
              f"node; here: twinflow generate --model BASE --extra-weights {out}/{files[0]})")
        from twinflow.adapters import ZERO_TIME_KEY, read_export_metadata

        zero_time = read_export_metadata(out).get(ZERO_TIME_KEY)
        if zero_time == "data":
            print("note: this Z-Image model reads r = 0 as the data end (README, departure 5); ComfyUI's nodes read it "
                  "as the reference does, which changes the one-step target there")
    elif (out / LORA_WEIGHTS_FILE).is_file():
        print(f"LoRA adapter: {out} (use: twinflow generate --model BASE --lora {out})")
    elif (out / "model_index.json").is_file():
        print(f"pipeline folder: {out} (use: twinflow generate --model {out})")
    else:
        print(f"transformer folder: {out} (no pipeline to join it to: give --pipeline for a folder twinflow generate loads)")


def command_encode(arguments: argparse.Namespace) -> None:
    from twinflow.generation import PromptEncoder, save_embeddings

    prompts = read_prompts(arguments)
    if not prompts:
        raise ValueError("give --prompt or --prompt-file")
    encoder = PromptEncoder.from_pretrained(
        arguments.model, device=arguments.device, dtype=arguments.dtype, max_sequence_length=arguments.max_sequence_length
    )
    conditions = encoder.encode(prompts, batch_size=arguments.batch_size)
    null = encoder.encode_null()  # the unconditional input, should the file be used with guidance
    path = save_embeddings(arguments.out, conditions, prompts, null_condition=null, family=encoder.family.name)
    print(f"encoded {len(prompts)} prompt(s) for {encoder.family.name}: {path}")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (bad input, missing or unreadable files, a full disk,
    a diverged run) exit with code 2 and one line naming the flag, key or file; anything else is
    a bug: a one-line summary, the traceback, exit code 1."""
    arguments = build_parser().parse_args(argv)
    from twinflow.train.loop import TrainingDiverged

    expected = (ValueError, OSError, ImportError, TrainingDiverged)

    handlers = {
        "train": command_train, "sample": command_sample, "eval": command_eval,
        "generate": command_generate, "encode": command_encode, "export": command_export,
        "cache": command_cache,
    }
    try:
        handlers[arguments.command](arguments)
    except expected as error:  # bad input, missing or unreadable files, a full disk, divergence
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug: the summary first, then the traceback to report
        print(f"error: internal error, please report it with the traceback below: {type(error).__name__}: "
              f"{_one_line(error)}", file=sys.stderr)
        traceback.print_exc()
        return 1
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
