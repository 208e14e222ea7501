"""A prepared GPU check: full-size Z-Image (6.15B) and Qwen-Image (20.4B), random weights, one command.

The device machine (one H200, no internet) has torch, transformers, accelerate, safetensors and
huggingface_hub but not diffusers; diffusers 0.42.1 and peft 0.21.2 travel as wheels in the
ignored folder ``.whl/`` (made here once with ``.venv/bin/python -m pip download --no-deps
--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
-d .whl diffusers==0.42.1 peft==0.21.2``; the device tool's ``carry: [".whl"]``). The command,
from the repository root (``timeout_s`` 600)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --out $OUT/gpu_check 2>&1 | tee $OUT/gpu_check.log

Expected: about 4 minutes after the machine's start (imports ~20 s; each model is built on the
GPU in seconds; Qwen-Image's 2-3 minutes are the largest part), never much more than
``--deadline`` (8) minutes: a section that would start after it, or with less time left than it
needs, is skipped and reported as skipped. The JSON and markdown are rewritten after every
section, so a run killed from outside still leaves what it measured. Without ``--out`` a GPU run
writes ``benchmarks/results/gpu_check.{json,md}``.

Without a GPU, ``python benchmarks/gpu_check.py`` runs every section on tiny random
configurations on the CPU (about 30 s here, ``--quick`` 15 s) and says loudly that those figures
are not the GPU figures, which stay open; it writes ``benchmarks/results/gpu_check_cpu_tiny.*``
(never the GPU report's name). ``--check-full-size`` runs the full-size code path on the CPU
instead: the real configurations' widths, shapes and VAEs, truncated to ``--layers`` (1) blocks,
bf16 weights and autocast, 256 px images and 16x16 training latents, to catch API mismatches
without the real size (about 12 minutes on 2 cores; ``--families`` / ``--sections`` split it).
``--layers N`` on a GPU is a quick first look at the same path.

Sections (each guarded: an error or out-of-memory is recorded with its traceback and the rest
still runs; each model is freed before the next is built):

* ``plan``: both transformers at their real configuration on the meta device (no memory): the
  parameter counts, the adapter (``emb_2``) and the LoRA adapters injected as trained, and the
  memory that each measured configuration needs for its weights and optimizer state.
* ``build/<family>``: the transformer and VAE built directly on the device in bf16
  (``torch.device`` construction with bf16 as default dtype, so 20B parameters never sit in CPU
  memory) and wrapped as the project's ``TextToImage`` (adapter + diffusers pipeline parts).
* ``generation/<family>``: seconds per 1024x1024 image of ``TextToImage.generate`` with the
  project's presets ``1nfe``, ``2nfe``, ``4nfe`` (the median of ``--repeats`` calls after one
  warm-up), split into transformer forwards (hooks, synchronised), VAE decode and everything
  else (noise, sampler arithmetic, adapter packing, conversion to PIL). The prompt is a
  precomputed random embedding of ``--text-tokens`` tokens at the text encoder's real width
  (Qwen2.5-VL-7B: 3584, Qwen3-4B: 2560): no text encoder runs. Peak CUDA memory per row
  (``max_memory_allocated``, reset after the warm-up).
* ``sampler_overhead/<family>``: ``twinflow.sample`` through the ``TextToImage`` model function
  (what ``generate`` runs, without decoding) against the same number of bare transformer
  forwards on the very inputs the sampler gave it (recorded by a hook and replayed), and
  against as many calls of the adapter; the ratios are the sampler's and the adapter's cost.
* ``training_lora/<family>``: one optimizer step of ``twinflow train``'s order (the objective
  through ``train.loop.objective_loss`` under bf16 autocast, backward, clipping, AdamW, teacher
  update; ``benchmarks/finetune_cost.FinetuneStep``) on the frozen bf16 base with PEFT LoRA rank
  64 on the attention projections and ``emb_2`` trained in full, diffusers' gradient
  checkpointing: flow matching, then TwinFlow with the EMA teacher as a second adapter. Both
  rows train the same model (the generation section's transformer), so the flow-matching row
  also holds the unused EMA adapter (its size is reported). Batch ``--train-batch`` of
  ``--train-latent`` latents (64: 512 px images), ``--train-tokens``-token prompts; seconds per
  step are the mean of ``--train-steps`` steps after one warm-up (an even number, since a batch
  of 2 holds two of the objective's four slices and the next step the other two).
* ``training_full/<family>`` (Z-Image only: full-parameter AdamW on 20B needs 16 bytes per
  parameter, 327 GB): fp32 weights under bf16 autocast, as ``twinflow train`` trains
  full-parameter, gradient checkpointing, AdamW: flow matching, TwinFlow with the model as its
  own teacher (EMA decay 0, what the spec recommends at this size) and TwinFlow with an EMA copy
  (``--ema-decay``), which needs 20 bytes per parameter (123 GB for 6.15B) and may not fit: an
  out-of-memory there is recorded as that row's result. On CUDA AdamW is ``fused=True`` (all
  rows, LoRA too): torch's default (foreach) AdamW allocates one more weight-sized fp32
  temporary in ``step()``, which the EMA row could not afford; ``--no-fused-adamw`` measures the
  default.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

# Less fragmentation between the sections' very different allocations (a 40 GB model, then a
# 115 GB training state); set before torch initialises CUDA. Peaks are allocated bytes anyway.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generation_speed  # noqa: E402
from machine import call_seconds, machine_description, synchronise  # noqa: E402
from finetune_cost import FinetuneStep, Options, Setting, random_batch  # noqa: E402

FAMILIES = ("z_image", "qwen_image")  # the cheaper model first: it is measured even if the 20B one fails
NFE = (1, 2, 4)
SECTION_KINDS = ("plan", "generation", "sampler_overhead", "training_lora", "training_full")
FULL_TRAINING_FAMILIES = ("z_image",)
ATTENTION_PROJECTIONS = {  # LoRA targets: every attention projection of the family's blocks
    "z_image": ["to_q", "to_k", "to_v", "to_out.0"],
    "qwen_image": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}
# Seconds a full-size section needs at least to be worth starting (time left before the deadline).
MINIMUM_SECONDS = {
    "build/z_image": 20, "build/qwen_image": 45, "generation/z_image": 20, "generation/qwen_image": 45,
    "sampler_overhead/z_image": 10, "sampler_overhead/qwen_image": 25,
    "training_lora/z_image": 25, "training_lora/qwen_image": 60, "training_full/z_image": 45,
}
CPU_WARNING = (
    "CPU FALLBACK: no GPU was used. These figures come from {what} on the CPU and say nothing about "
    "the speed or memory of the real models; the GPU figures of issue 12 are still open."
)


# ---- settings ----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the run does, resolved from the flags and the device."""

    kind: str  # full-size | truncated (real widths, fewer blocks) | tiny
    device: str
    dtype: str  # weights of generation and of the LoRA base: bf16 | fp32
    precision: str  # training autocast: bf16 | fp32
    families: list[str]
    nfe: list[int]
    size: int
    repeats: int
    text_tokens: int
    train_batch: int
    train_latent: int
    train_tokens: int
    train_steps: int
    lora_rank: int
    lora_families: list[str]
    full_families: list[str]
    ema_decay: float
    fused_adamw: bool
    layers: int | None
    threads: int
    deadline_s: float
    sections: list[str]
    out: str

    @property
    def is_gpu_figure(self) -> bool:
        return self.device.startswith("cuda") and self.kind == "full-size"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="path stem of the reports, .json and .md are added (default: "
                        "benchmarks/results/gpu_check on a GPU, benchmarks/results/gpu_check_<kind> otherwise)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configurations even on a GPU")
    parser.add_argument("--check-full-size", action="store_true",
                        help="the full-size code path on the CPU: real widths and VAEs, --layers blocks, bf16")
    parser.add_argument("--layers", type=int, help="transformer blocks (default: all; --check-full-size: 1)")
    parser.add_argument("--quick", action="store_true", help="fewest repeats and steps (the test's setting)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: z_image, qwen_image")
    parser.add_argument("--sections", default=",".join(SECTION_KINDS), help=f"comma-separated of {SECTION_KINDS}")
    parser.add_argument("--nfe", default=",".join(map(str, NFE)), help="network evaluations per image")
    parser.add_argument("--size", type=int, help="image side (default: 1024; tiny 64; --check-full-size 256)")
    parser.add_argument("--repeats", type=int, help="timed calls per row, the median counts (default 3; --quick 1)")
    parser.add_argument("--text-tokens", type=int, help="prompt length of the random embeddings (default 128)")
    parser.add_argument("--train-batch", type=int, default=2, help="training batch (per GPU)")
    parser.add_argument("--train-latent", type=int, help="training latent side (default 64 = 512 px; tiny 16)")
    parser.add_argument("--train-tokens", type=int, help="training prompt length (default 128; tiny 16)")
    parser.add_argument("--train-steps", type=int, help="timed optimizer steps per row (default 4; --quick 2)")
    parser.add_argument("--lora-rank", type=int, help="LoRA rank and alpha (default 64; tiny 4)")
    parser.add_argument("--lora-families", help="families trained with LoRA (default: --families)")
    parser.add_argument("--full-families",
                        help="families trained full-parameter (default: z_image if in --families; qwen_image does not "
                        "fit one GPU)")
    parser.add_argument("--ema-decay", type=float, default=0.99, help="the EMA teacher's decay (TwinFlow rows)")
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                        help="AdamW(fused=True) (default: on CUDA)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default 1; --check-full-size 2)")
    parser.add_argument("--deadline", type=float,
                        help="minutes; sections that would start later are skipped (default 8; --check-full-size 30)")
    return parser.parse_args(argv)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def resolve_plan(arguments: argparse.Namespace) -> Plan:
    from twinflow.devices import resolve_device

    device = resolve_device(arguments.device)
    if arguments.check_full_size and arguments.tiny:
        raise SystemExit("--check-full-size and --tiny exclude each other")
    layers = arguments.layers if arguments.layers is not None else (1 if arguments.check_full_size else None)
    tiny = arguments.tiny or (device.type != "cuda" and not arguments.check_full_size and layers is None)
    kind = "tiny" if tiny else ("truncated" if layers is not None else "full-size")
    if device.type != "cuda" and kind == "full-size":
        raise SystemExit("the full-size models need a GPU; on the CPU use --check-full-size (or --layers N)")
    families, sections = _names(arguments.families), _names(arguments.sections)
    for name in families:
        if name not in FAMILIES:
            raise SystemExit(f"unknown family {name!r}; choose from {FAMILIES}")
    for name in sections:
        if name not in SECTION_KINDS:
            raise SystemExit(f"unknown section {name!r}; choose from {SECTION_KINDS}")
    quick = arguments.quick
    small = kind == "tiny"
    check = kind == "truncated" and device.type != "cuda"
    size = arguments.size or (64 if small else 256 if check else 1024)
    # A CPU or truncated run does not overwrite the GPU report by default.
    name = "gpu_check" if (device.type == "cuda" and kind == "full-size") else f"gpu_check_{device.type}_{kind.replace('-', '_')}"
    out = arguments.out or f"benchmarks/results/{name}"
    if Path(out).is_dir() or out.endswith("/"):
        out = str(Path(out) / name)  # a folder: the default file names inside it
    elif out.endswith((".json", ".md")):
        out = str(Path(out).with_suffix(""))
    plan = Plan(
        kind=kind, device=str(device),
        dtype="fp32" if small and device.type != "cuda" else "bf16",
        precision="fp32" if small and device.type != "cuda" else "bf16",
        families=families, nfe=[int(value) for value in _names(arguments.nfe)], size=size,
        repeats=arguments.repeats or (1 if quick or check else 3),
        text_tokens=arguments.text_tokens or (16 if small else 32 if check else 128),
        train_batch=arguments.train_batch,
        train_latent=arguments.train_latent or (16 if small or check else 64),
        train_tokens=arguments.train_tokens or (16 if small else 32 if check else 128),
        train_steps=arguments.train_steps or (2 if quick or check else 4),
        lora_rank=arguments.lora_rank or (4 if small else 64),
        lora_families=_names(arguments.lora_families) if arguments.lora_families is not None else list(families),
        full_families=(_names(arguments.full_families) if arguments.full_families is not None
                       else [name for name in FULL_TRAINING_FAMILIES if name in families]),
        ema_decay=arguments.ema_decay,
        fused_adamw=device.type == "cuda" if arguments.fused_adamw is None else arguments.fused_adamw,
        layers=layers, threads=arguments.threads or (2 if check else 1),
        deadline_s=60.0 * (arguments.deadline if arguments.deadline is not None else 30.0 if check else 8.0),
        sections=sections, out=out,
    )
    if plan.train_steps < 1 or plan.repeats < 1 or plan.train_batch < 1:
        raise SystemExit("--train-steps, --repeats and --train-batch must be positive")
    if not 0 < plan.ema_decay < 1:
        raise SystemExit("--ema-decay must lie in (0, 1)")
    return plan


# ---- time, memory, sections -----------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float, started: float | None = None):
        self.started = time.monotonic() if started is None else started
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Memory:
    """Peak memory of one measurement: the CUDA allocator's (reset first), or on the CPU the
    process's peak resident set, which only ever grows."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    @property
    def kind(self) -> str:
        if self.cuda:
            return "peak CUDA memory (torch.cuda.max_memory_allocated, reset before each measurement)"
        return "peak resident set of the process (only grows: later rows include earlier ones)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated_mib(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else None

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return generation_speed.peak_memory(self.device) / 2**20

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def median_seconds(function, repeats: int, device: torch.device) -> float:
    """The median wall time of ``repeats`` calls (synchronised on CUDA)."""
    return statistics.median(call_seconds(function, repeats, device))


class Report:
    """The sections so far; :meth:`save` rewrites the JSON and the markdown."""

    def __init__(self, plan: Plan, header: dict, log):
        self.plan = plan
        self.header = header
        self.sections: list[dict] = []
        self.log = log

    def section(self, name: str) -> dict | None:
        return next((entry for entry in self.sections if entry["name"] == name), None)

    def as_dict(self, elapsed: float) -> dict:
        return {**self.header, "elapsed_s": elapsed, "sections": self.sections,
                "skipped": [entry["name"] for entry in self.sections if entry["status"] == "skipped"],
                "failed": [entry["name"] for entry in self.sections if entry["status"] == "failed"]}

    def save(self, elapsed: float) -> None:
        report = self.as_dict(elapsed)
        stem = Path(self.plan.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        try:
            text = markdown(report)
        except Exception:  # noqa: BLE001 - the JSON holds everything; the run must go on
            text = f"# {report['title']}\n\nThe markdown could not be rendered (the JSON is complete):\n\n```\n" \
                   f"{traceback.format_exc()}```\n"
        stem.with_suffix(".md").write_text(text)


class Runner:
    """Runs one section at a time: skipped when not selected, after the deadline or when what
    it needs failed; an exception is the section's result (``failed``), never the run's end."""

    def __init__(self, plan: Plan, report: Report, deadline: Deadline, memory: Memory, log):
        self.plan, self.report, self.deadline, self.memory, self.log = plan, report, deadline, memory, log

    def run(self, name: str, function, *, needs: str | None = None, selected: bool | None = None):
        """Run ``function(entry)`` as section ``name`` (selected by its kind, the part before ``/``,
        unless ``selected`` says otherwise) and return its result, ``None`` when it did not run."""
        entry = {"name": name, "status": "skipped", "seconds": 0.0, "reason": None, "error": None,
                 "rows": [], "notes": []}
        self.report.sections.append(entry)
        minimum = MINIMUM_SECONDS.get(name, 0) if self.plan.kind == "full-size" else 0
        left = self.deadline.left()
        result = None
        if not (name.split("/")[0] in self.plan.sections if selected is None else selected):
            entry["reason"] = "not selected (--sections)"
        elif needs is not None and (self.report.section(needs) or {}).get("status") != "ok":
            entry["reason"] = f"needs {needs}, which did not succeed"
        elif left <= 0 or left < minimum:
            entry["reason"] = f"deadline: {max(left, 0):.0f} s left, the section needs about {minimum} s"
        else:
            self.log(f"{name}: started ({left:.0f} s left before the deadline)")
            started = time.perf_counter()
            try:
                result = function(entry)
                entry["status"] = "ok"
            except Exception as error:  # noqa: BLE001 - recorded, and the run goes on
                entry["status"] = "failed"
                entry["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                entry["traceback"] = traceback.format_exc().splitlines()[-30:]
                result = None
            entry["seconds"] = time.perf_counter() - started
            self.memory.free()
        self.log(f"{name}: {entry['status']}" + (f" ({entry['reason']})" if entry["reason"] else "")
                 + (f" - {entry['error']}" if entry["error"] else "") + f" [{entry['seconds']:.1f} s]")
        self.report.save(self.deadline.elapsed())
        return result


# ---- models ------------------------------------------------------------------------------------------


def transformer_overrides(family: str, layers: int | None) -> dict:
    """Config fields that truncate a full-size transformer to ``layers`` blocks of the real width."""
    if layers is None:
        return {}
    if family == "qwen_image":
        return {"num_layers": layers}
    return {"n_layers": layers, "n_refiner_layers": min(layers, 2)}


def build_text_to_image(plan: Plan, family: str):
    """The project's ``TextToImage`` around random parts built on the device (generation_speed)."""
    device = torch.device(plan.device)
    return generation_speed.build_model(family, plan.kind == "tiny", device, plan.torch_dtype,
                                        transformer_overrides(family, plan.layers))


def build_adapter(plan: Plan, family: str, dtype: torch.dtype):
    """The adapted random transformer alone, built on the device in ``dtype``."""
    from twinflow.adapters import adapter_for
    from twinflow.testing import BUILDERS

    device = torch.device(plan.device)
    torch.manual_seed(0)
    with generation_speed.building_on(device, dtype):
        if plan.kind == "tiny":
            transformer = BUILDERS[family](False)["transformer"]
        else:
            transformer = generation_speed.full_size_transformer(family, **transformer_overrides(family, plan.layers))
    transformer = transformer.to(device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 starts as a copy of emb: random weights anyway
        return adapter_for(transformer)


def lora_settings(family: str, rank: int) -> dict:
    """LoRA of rank ``rank`` (alpha = rank) on the family's attention projections, emb_2 trained in full."""
    from twinflow.train.lora import lora_options

    return lora_options({"rank": rank, "alpha": rank, "target_modules": ATTENTION_PROJECTIONS[family],
                         "train_second_embedding": True})


def full_size_rank(plan: Plan) -> int:
    """The LoRA rank the real configurations are planned with (the tiny run's rank fits tiny models only)."""
    return 64 if plan.kind == "tiny" else plan.lora_rank


def training_options(plan: Plan) -> Options:
    """finetune_cost's options: the training keys of configs/qwen_image_twinflow.yaml, our batch."""
    from twinflow.train.config import load_config

    training = load_config(str(Path(__file__).resolve().parents[1] / "configs/qwen_image_twinflow.yaml"))["training"]
    return Options(
        device=plan.device, size=plan.kind, precision=plan.precision, gradient_checkpointing=True, lora={},
        optimizer=training["optimizer"], learning_rate=float(training["learning_rate"]), betas=list(training["betas"]),
        weight_decay=float(training["weight_decay"]), grad_clip=float(training["grad_clip"]),
        batch_size=plan.train_batch, latent_size=plan.train_latent, caption_tokens=plan.train_tokens,
        steps=plan.train_steps, threads=plan.threads,
    )


# ---- sections ----------------------------------------------------------------------------------------


def plan_section(entry: dict, plan: Plan) -> None:
    """The real configurations on the meta device: parameters, adapters, the memory they need."""
    from accelerate import init_empty_weights

    from twinflow.adapters import adapter_for
    from twinflow.train.lora import adapter_pairs, apply_lora

    capacity = torch.cuda.get_device_properties(plan.device).total_memory if plan.device.startswith("cuda") else None
    gib = 2**30
    for family in plan.families:
        with init_empty_weights():  # parameters on the meta device: nothing is allocated
            transformer = generation_speed.full_size_transformer(family)
            parameters = sum(parameter.numel() for parameter in transformer.parameters())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = adapter_for(transformer)
            adapted = sum(parameter.numel() for parameter in model.parameters())
            apply_lora(model, lora_settings(family, full_size_rank(plan)), ema=True)
        lora = sum(parameter.numel() for name, parameter in model.named_parameters() if "lora_" in name)
        ema = sum(ema_parameter.numel() for ema_parameter, _ in adapter_pairs(model))
        trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        estimates = {
            "inference_bf16_gib": 2 * adapted / gib,
            # frozen bf16 base, fp32 adapters (trained and EMA), gradients and two moments of what trains
            "lora_training_state_gib": (2 * adapted + 4 * lora + 12 * trainable) / gib,
            "full_training_state_gib": 16 * adapted / gib,  # fp32 weights, gradients, two AdamW moments
            "full_training_ema_copy_gib": 20 * adapted / gib,
        }
        row = {"family": family, "class": type(transformer).__name__, "parameters": parameters,
               "adapted_parameters": adapted, "second_embedding_parameters": adapted - parameters,
               "lora_parameters": lora, "lora_ema_parameters": ema, "lora_trainable_parameters": trainable,
               "lora_rank": full_size_rank(plan), **estimates}
        if capacity:
            row["fits"] = {key: value * gib < 0.95 * capacity for key, value in estimates.items()}
        entry["rows"].append(row)
        del model, transformer
    entry["notes"].append("Meta-device construction of the real configurations (diffusers defaults); state estimates "
                          "exclude activations and the allocator's slack.")
    if capacity:
        entry["notes"].append(f"GPU memory: {capacity / gib:.1f} GiB.")


def generation_section(entry: dict, plan: Plan, model, deadline: Deadline, log) -> None:
    watch = generation_speed.Stopwatch(model)
    condition = generation_speed.random_condition(model, plan.text_tokens)
    try:
        for nfe in plan.nfe:
            if deadline.left() <= 0:
                entry["notes"].append(f"{nfe} NFE not measured: deadline")
                continue
            row = generation_speed.measure(model, watch, nfe, plan.size, plan.repeats, condition)
            entry["rows"].append({
                "family": row.family, "nfe": row.nfe, "preset": row.preset, "size": plan.size,
                "seconds": row.seconds, "transformer_s": row.transformer, "vae_s": row.vae,
                "other_s": row.seconds - row.transformer - row.vae, "network_calls": row.calls,
                "peak_memory_mib": row.peak_bytes / 2**20,
            })
            log(f"  {row.family} {nfe} NFE: {row.seconds:.4f} s per image (transformer {row.transformer:.4f}, "
                f"VAE {row.vae:.4f}), peak {row.peak_bytes / 2**20:,.0f} MiB")
    finally:
        watch.remove()


def overhead_section(entry: dict, plan: Plan, model, memory: Memory, deadline: Deadline, log) -> None:
    """``twinflow.sample`` against the same number of bare transformer (and adapter) calls."""
    from twinflow.sampler import resolve_sampler
    from twinflow.sampler import sample

    device = model.device
    transformer = model.adapter.transformer
    condition = model._prepare(generation_speed.random_condition(model, plan.text_tokens))
    shape = model.latent_shape(plan.size, plan.size)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    for nfe in plan.nfe:
        if deadline.left() <= 0:
            entry["notes"].append(f"{nfe} NFE not measured: deadline")
            continue
        preset = generation_speed.preset_for(nfe)
        config = resolve_sampler(preset)
        adapter_inputs, transformer_inputs = [], []

        def recording_model(x, t, r, c):
            adapter_inputs.append((x, t, r))
            return model._model(x, t, r, c)

        hook = transformer.register_forward_pre_hook(
            lambda module, args, kwargs: transformer_inputs.append((args, dict(kwargs))), with_kwargs=True)
        try:
            result = sample(recording_model, noise, condition, config, generator=[torch.Generator().manual_seed(0)])
        finally:
            hook.remove()
        if result.network_calls != nfe or len(transformer_inputs) != nfe:
            raise RuntimeError(f"{preset}: {result.network_calls} network calls, {len(transformer_inputs)} transformer "
                               f"calls, expected {nfe}")

        def sampler() -> None:
            sample(model._model, noise, condition, config, generator=[torch.Generator().manual_seed(0)])

        @torch.no_grad()
        def adapter_calls() -> None:
            for x, t, r in adapter_inputs:
                model._model(x, t, r, condition)

        @torch.no_grad()
        def transformer_calls() -> None:
            for args, kwargs in transformer_inputs:  # lists (Z-Image's inputs) copied: the call may not keep them
                transformer(*[list(a) if isinstance(a, list) else a for a in args], **kwargs)

        row = {"family": model.family.name, "nfe": nfe, "preset": preset, "network_calls": result.network_calls}
        for name, function in (("sample_s", sampler), ("adapter_calls_s", adapter_calls),
                               ("transformer_calls_s", transformer_calls)):
            function()  # warm-up
            memory.reset()
            row[name] = median_seconds(function, plan.repeats, device)
            row[name.replace("_s", "_peak_mib")] = memory.peak_mib()
        row["sample_vs_transformer"] = row["sample_s"] / row["transformer_calls_s"]
        row["sample_vs_adapter"] = row["sample_s"] / row["adapter_calls_s"]
        row["overhead_percent"] = 100 * (row["sample_s"] - row["transformer_calls_s"]) / row["transformer_calls_s"]
        entry["rows"].append(row)
        log(f"  {model.family.name} {nfe} NFE: sample {row['sample_s']:.4f} s, {nfe} transformer calls "
            f"{row['transformer_calls_s']:.4f} s ({row['sample_vs_transformer']:.3f}x)")
        del adapter_inputs, transformer_inputs


def training_rows(entry: dict, plan: Plan, model, mode: str, settings: list[Setting], memory: Memory,
                  deadline: Deadline, log) -> None:
    """One row per setting on the same model and batch; an out-of-memory is that row's result."""
    options = training_options(plan)
    device = torch.device(plan.device)
    batch = random_batch(model, options, device)
    optimizer_options = {"fused": True} if plan.fused_adamw else {}
    rows = []
    for setting in settings:
        row = {"family": model.family, "mode": mode, "method": setting.method, "ema_decay": setting.ema_decay,
               "teacher": setting.teacher, "seconds_per_step": None, "network_calls": None, "peak_memory_mib": None,
               "error": None}
        rows.append(row)
        entry["rows"].append(row)
        if deadline.left() <= 0:
            row["error"] = "not measured: deadline"
            continue
        memory.free()
        memory.reset()
        row["resident_before_mib"] = memory.allocated_mib()
        step = None
        try:
            step = FinetuneStep(setting, options, model=model, batch=batch, optimizer_options=optimizer_options)
            step()  # warm-up: optimizer state, kernels, allocator
            seconds, calls = [], []
            for _ in range(plan.train_steps):
                synchronise(device)
                started = time.perf_counter()
                step()
                synchronise(device)
                seconds.append(time.perf_counter() - started)
                calls.append(step.network_calls)
            row.update(step.parameter_counts())
            row.update(seconds_per_step=statistics.mean(seconds), step_seconds=seconds,
                       network_calls=statistics.mean(calls), network_calls_per_step=calls,
                       peak_memory_mib=memory.peak_mib())
            log(f"  {model.family} {mode} {setting.method} (teacher {setting.teacher}): "
                f"{row['seconds_per_step']:.3f} s/step, {row['network_calls']:g} calls/step, "
                f"peak {row['peak_memory_mib']:,.0f} MiB")
        except torch.OutOfMemoryError as error:
            row["error"] = f"out of memory: {str(error).splitlines()[0]}"
            row["peak_memory_mib"] = memory.peak_mib()
            log(f"  {model.family} {mode} {setting.method} (teacher {setting.teacher}): {row['error']}")
        finally:
            step = None
            model.zero_grad(set_to_none=True)
            memory.free()
    baseline = next((row for row in rows if row["method"] == "flow_matching" and row["seconds_per_step"]), None)
    for row in rows:
        if baseline and row["seconds_per_step"]:
            row["time_vs_flow_matching"] = row["seconds_per_step"] / baseline["seconds_per_step"]
            row["memory_vs_flow_matching"] = row["peak_memory_mib"] / baseline["peak_memory_mib"]


def lora_section(entry: dict, plan: Plan, family: str, adapter, memory: Memory, deadline: Deadline, log) -> None:
    from twinflow.train.backbone import enable_gradient_checkpointing
    from twinflow.train.lora import adapter_pairs, apply_lora

    if adapter is None:
        adapter = build_adapter(plan, family, plan.torch_dtype)
        entry["notes"].append("transformer built for this section (no generation model to reuse)")
    else:
        entry["notes"].append("the generation section's transformer, reused")
    enable_gradient_checkpointing(adapter)
    options = lora_settings(family, plan.lora_rank)
    apply_lora(adapter, options, ema=True)
    ema_mib = sum(parameter.numel() * parameter.element_size() for parameter, _ in adapter_pairs(adapter)) / 2**20
    base_dtype = str(next(p for n, p in adapter.named_parameters() if "lora_" not in n).dtype).removeprefix("torch.")
    entry["notes"].append(
        f"frozen {base_dtype} base; LoRA rank {options['rank']} (alpha {options['alpha']}) on "
        f"{', '.join(options['target_modules'])}, fp32, plus emb_2 trained in full; the EMA adapter ({ema_mib:,.1f} MiB) "
        "is in the model in both rows (unused by flow matching)")
    settings = [Setting("flow_matching", "lora", 0.0), Setting("twinflow", "lora", plan.ema_decay)]
    training_rows(entry, plan, adapter, "lora", settings, memory, deadline, log)


def full_section(entry: dict, plan: Plan, family: str, memory: Memory, deadline: Deadline, log) -> None:
    from twinflow.train.backbone import enable_gradient_checkpointing

    model = build_adapter(plan, family, torch.float32)
    enable_gradient_checkpointing(model)
    entry["notes"].append("fp32 weights (as twinflow train trains full-parameter), bf16 autocast"
                          if plan.precision == "bf16" else "fp32 weights, fp32 (no autocast)")
    settings = [Setting("flow_matching", "full", 0.0), Setting("twinflow", "full", 0.0),
                Setting("twinflow", "full", plan.ema_decay)]
    training_rows(entry, plan, model, "full", settings, memory, deadline, log)


# ---- the run -----------------------------------------------------------------------------------------


def header(plan: Plan, memory: Memory, argv: list[str]) -> dict:
    import diffusers
    import peft

    device = torch.device(plan.device)
    what = {"tiny": "tiny random configurations",
            "truncated": f"the real configurations truncated to {plan.layers} block(s)"}.get(plan.kind, "")
    warning = None
    if device.type != "cuda":
        warning = CPU_WARNING.format(what=what)
    elif plan.kind != "full-size":
        warning = f"GPU, but {what}: not the full-size figures of issue 12, which are still open."
    gpu = (f"{torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB, "
           f"CUDA {torch.version.cuda}") if device.type == "cuda" else None
    return {
        "title": "GPU check: TwinFlow on Z-Image (6.15B) and Qwen-Image (20.4B), random weights",
        "kind": f"{device.type}-{plan.kind}", "gpu_figures": plan.is_gpu_figure, "warning": warning,
        "machine": machine_description(), "gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "peft": peft.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", "benchmarks/gpu_check.py", *argv]),
        "deadline_s": plan.deadline_s, "memory_kind": memory.kind, "settings": asdict(plan),
        "conditions": [
            f"random weights; {plan.dtype} weights for generation and the LoRA base",
            f"prompts: precomputed random embeddings of {plan.text_tokens} tokens (training {plan.train_tokens}) at the "
            "text encoder's width (Z-Image: Qwen3-4B, 2560; Qwen-Image: Qwen2.5-VL-7B, 3584); no text encoder ran, "
            "prompt encoding is not timed",
            f"generation: {plan.size}x{plan.size}, one image per call, median of {plan.repeats} after one warm-up",
            f"training: batch {plan.train_batch} of {plan.train_latent}x{plan.train_latent} latents, "
            f"{'bf16 autocast' if plan.precision == 'bf16' else 'fp32 (no autocast)'}, gradient checkpointing, "
            f"AdamW{' (fused)' if plan.fused_adamw else ''}, mean of {plan.train_steps} steps after one warm-up",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    deadline_started = time.monotonic()
    arguments = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    plan = resolve_plan(arguments)
    device = torch.device(plan.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(plan.threads)
    try:
        return _run(plan, argv, deadline_started)
    finally:
        torch.set_num_threads(threads)  # as it was (the test runs this in its own process)


def _run(plan: Plan, argv: list[str], deadline_started: float) -> int:
    device = torch.device(plan.device)
    deadline = Deadline(plan.deadline_s, started=deadline_started)
    memory = Memory(device)

    def log(line: str) -> None:
        print(f"[{deadline.elapsed():6.1f} s] {line}", file=sys.stderr, flush=True)

    report = Report(plan, header(plan, memory, argv), log)
    if report.header["warning"]:
        banner = "!" * 100
        print(f"{banner}\n{report.header['warning']}\n{banner}", file=sys.stderr, flush=True)
    runner = Runner(plan, report, deadline, memory, log)

    runner.run("plan", lambda entry: plan_section(entry, plan))
    for family in plan.families:
        wants_model = {"generation", "sampler_overhead"} & set(plan.sections)
        holder = {"model": None}

        def build(entry, family=family):
            model = build_text_to_image(plan, family)
            parameters = sum(parameter.numel() for parameter in model.adapter.parameters())
            entry["rows"].append({"family": family, "parameters": parameters, "dtype": plan.dtype,
                                  "resident_mib": memory.allocated_mib()})
            log(f"  {family}: {parameters / 1e9:.3f}B parameters (adapter included) on {plan.device}")
            holder["model"] = model

        runner.run(f"build/{family}", build, selected=bool(wants_model))
        runner.run(f"generation/{family}",
                   lambda entry: generation_section(entry, plan, holder["model"], deadline, log), needs=f"build/{family}")
        runner.run(f"sampler_overhead/{family}",
                   lambda entry: overhead_section(entry, plan, holder["model"], memory, deadline, log),
                   needs=f"build/{family}")
        adapter = holder["model"].adapter if holder["model"] is not None else None
        holder["model"] = None  # the pipeline and its VAE go; the adapter stays for LoRA training
        memory.free()
        if family in plan.lora_families:
            runner.run(f"training_lora/{family}",
                       lambda entry: lora_section(entry, plan, family, adapter, memory, deadline, log))
        adapter = None
        memory.free()
    for family in plan.full_families:
        runner.run(f"training_full/{family}", lambda entry: full_section(entry, plan, family, memory, deadline, log))
    report.save(deadline.elapsed())
    text = Path(plan.out).with_suffix(".md").read_text()
    print(text)
    log(f"wrote {Path(plan.out).with_suffix('.json')} and {Path(plan.out).with_suffix('.md')}")
    if report.header["warning"]:
        print(f"{'!' * 100}\n{report.header['warning']}\n{'!' * 100}", file=sys.stderr, flush=True)
    return 0


# ---- markdown ----------------------------------------------------------------------------------------


def _number(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def markdown(report: dict) -> str:
    settings = report["settings"]
    sections = report["sections"]
    lines = [f"# {report['title']}", ""]
    if report["warning"]:
        lines += [f"> **{report['warning']}**", ""]
    lines += [
        f"Kind: `{report['kind']}`. Machine: {report['machine']}" + (f"; GPU: {report['gpu']}" if report["gpu"] else "")
        + f". torch {report['torch']}, diffusers {report['diffusers']}, peft {report['peft']}. {report['date']}; "
        f"{report['elapsed_s'] / 60:.1f} minutes (deadline {report['deadline_s'] / 60:.0f}).",
        f"Command: `{report['command']}`",
        "",
        *[f"- {line}" for line in report["conditions"]],
        f"- memory: {report['memory_kind']}",
        "",
        "## Sections",
        "",
        "| section | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for entry in sections:
        note = entry.get("error") or entry.get("reason") or "; ".join(entry.get("notes", []))
        lines.append(f"| {entry['name']} | {entry['status']} | {entry['seconds']:.1f} | {note} |")
    rows = lambda kind: [row for entry in sections if entry["name"].split("/")[0] == kind for row in entry["rows"]]  # noqa: E731

    generation = rows("generation")
    lines += ["", f"## 1. Latency per image, {settings['size']}x{settings['size']}", ""]
    if generation:
        lines += ["| model | NFE | preset | s / image | transformer s | VAE decode s | everything else s "
                  "| transformer calls | peak memory (MiB) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['family']} | {row['nfe']} | `{row['preset']}` | {row['seconds']:.4f} | {row['transformer_s']:.4f} "
                  f"| {row['vae_s']:.4f} | {row['other_s']:.4f} | {row['network_calls']} | {row['peak_memory_mib']:,.0f} |"
                  for row in generation]
    else:
        lines.append("Not measured (see the sections).")

    overhead = rows("sampler_overhead")
    lines += ["", "## 2. Sampler overhead: `twinflow.sample` against bare transformer forwards", ""]
    if overhead:
        lines += ["| model | NFE | preset | sample s | NFE adapter calls s | NFE transformer calls s | sample / transformer "
                  "| sample / adapter | overhead | peak memory, sample (MiB) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['family']} | {row['nfe']} | `{row['preset']}` | {row['sample_s']:.4f} | {row['adapter_calls_s']:.4f} "
                  f"| {row['transformer_calls_s']:.4f} | {row['sample_vs_transformer']:.3f}x | {row['sample_vs_adapter']:.3f}x "
                  f"| {row['overhead_percent']:.1f}% | {row['sample_peak_mib']:,.0f} |" for row in overhead]
        lines += ["", "Sample: the sampler through the `TextToImage` model function, no VAE. Transformer calls: the "
                  "diffusers transformer on exactly the inputs the sampler's calls gave it (recorded, replayed), "
                  "without the adapter (no packing, no second time embedding). Adapter calls: the adapter on the "
                  "sampler's inputs."]
    else:
        lines.append("Not measured (see the sections).")

    training = rows("training_lora") + rows("training_full")
    lines += ["", "## 3. Training step: TwinFlow against flow matching", ""]
    if training:
        lines += ["| model | mode | method | teacher | trained parameters | network calls / step | s / step "
                  "| peak memory (MiB) | memory vs flow matching | time vs flow matching |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in training:
            mode = "full-parameter" if row["mode"] == "full" else "LoRA"
            if row.get("error"):
                lines.append(f"| {row['family']} | {mode} | {row['method']} | {row['teacher']} | {row['error']} | | | "
                             f"{_number(row.get('peak_memory_mib'), '{:,.0f}')} | | |")
                continue
            lines.append(
                f"| {row['family']} | {mode} | {row['method']} | {row['teacher']} | {row.get('trainable_parameters', 0):,} "
                f"| {row['network_calls']:g} | {row['seconds_per_step']:.3f} | {row['peak_memory_mib']:,.0f} "
                f"| {_number(row.get('memory_vs_flow_matching'), '{:.2f}x')} | {_number(row.get('time_vs_flow_matching'), '{:.2f}x')} |")
        notes = [note for entry in sections if entry["name"].split("/")[0].startswith("training") for note in
                 [f"{entry['name']}: {text}" for text in entry["notes"]]]
        lines += ["", *[f"- {note}" for note in notes]]
        lines.append("- Full-parameter training of Qwen-Image (20.4B) is not measured: fp32 weights, gradients and two "
                     "AdamW moments are 16 bytes per parameter (327 GB), beyond one GPU; it needs sharding (FSDP).")
    else:
        lines.append("Not measured (see the sections).")

    plan_rows = rows("plan")
    if plan_rows:
        lines += ["", "## Real configurations (meta device, no memory allocated)", "",
                  "| model | parameters | + emb_2 | LoRA (default + ema) | trained (LoRA + emb_2) | bf16 weights GiB "
                  "| LoRA training state GiB | full-parameter state GiB | + EMA copy GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['family']} | {row['parameters'] / 1e9:.3f}B | {row['second_embedding_parameters'] / 1e6:.1f}M "
                  f"| {row['lora_parameters'] / 1e6:.1f}M (rank {row['lora_rank']}) | {row['lora_trainable_parameters'] / 1e6:.1f}M "
                  f"| {row['inference_bf16_gib']:.1f} | {row['lora_training_state_gib']:.1f} | {row['full_training_state_gib']:.1f} "
                  f"| {row['full_training_ema_copy_gib']:.1f} |" for row in plan_rows]
        lines += ["", "State: weights, gradients and AdamW moments of what trains, the EMA teacher, no activations."]

    failed = [entry for entry in sections if entry["status"] == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for entry in failed:
            lines += [f"### {entry['name']}", "", "```", *entry.get("traceback", [entry["error"]]), "```", ""]
    if report["warning"]:
        lines += ["", f"> **{report['warning']}**"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
