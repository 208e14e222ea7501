"""The shipped large-model recipes at their families' real widths, on the CPU.

For each of ``configs/qwen_image_twinflow.yaml``, ``z_image_twinflow.yaml`` and
``sd35_medium_twinflow.yaml``: a pipeline folder whose transformer has the released model's
widths and module names but one or two blocks (:func:`~twinflow.testing.build_full_width_folder`:
Qwen-Image 24 x 128 heads, text 3584, 2 blocks, 0.72B parameters; Z-Image dim 3840, text 2560,
1 main + 1 noise-refiner + 1 context-refiner block, 0.55B; SD3.5 Medium 24 x 64 heads,
caption projection 1536, T5 4096 + pooled 2048, 2 blocks of which the first has the second
attention and the last is ``context_pre_only``, 0.18B), random weights stored in bfloat16 in
shards with an index (as released), a tiny 16-channel VAE (side halved) and no text encoders.
Then, through the command line as a user runs it, with only ``model.path``, ``data.root``,
``device``, the step count, the batch size and logging overridden:

1. ``twinflow train --dry-run --world-size 8`` (Z-Image: 1, its recipe is one GPU and has no
   ``distributed`` section): exit 0, FSDP units = the family's blocks, every LoRA target matched,
   the meta model's parameter count = the weights on disk;
2. two optimizer steps of the recipe (its precision bf16, bf16 base under LoRA, gradient
   checkpointing, LoRA targets and rank, Barron loss, guidance ratio 0.8, betas, warm-up, EMA)
   at a global batch of 2 with the recipe's own ``grad_accumulation`` (4 / 2 / 2 micro-steps),
   on latents of 16 x 4 x 6 with 6 text tokens: finite losses, a checkpoint, and trained
   weights that moved (every LoRA B / every full weight, see below);
3. ``twinflow export --ema`` (``--dtype bf16`` for the full-parameter SD3.5): the LoRA file and
   ``emb_2`` equal the checkpoint's EMA adapter and load onto the base; the SD3.5 folder holds
   the EMA weights in bf16 and loads with its ``emb_2``;
4. ``twinflow generate --embeddings FILE --size 16x8 --preset 1nfe`` from precomputed
   embeddings of the real text widths (two prompts, a null condition): two 16 x 8 PNGs.

Found here first: in the last block of both MMDiTs the text queries (``attn.add_q_proj``,
``attn.norm_added_q``) only reach the text stream's attention output, which that block discards,
so they get exactly zero gradient (a zero tensor, not ``None``). The adapters now declare them
(``modules_without_gradient``): the LoRA recipe gives them no adapter and full-parameter
training freezes them; the tests check both.

Cost on 2 CPU cores (one thread): 35-60 s and 4.7-5.1 GB peak per family; about 105 s and
6.1 GB for the whole file. The recipes' warm-up keeps the two steps' updates tiny (learning
rates 5e-7 to 4e-8), which is why the checks compare exactly rather than by size.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from dry_runs import dry_run  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.data import cache_dataset  # noqa: E402
from twinflow.generation.embeddings import save_embeddings  # noqa: E402
from twinflow.families import FAMILIES  # noqa: E402
from twinflow.testing import SD3_POOLED_WIDTH, TEXT_WIDTHS, build_full_width_folder  # noqa: E402
from twinflow.train.checkpoint import checkpoint_folder, list_checkpoints  # noqa: E402
from twinflow.train.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LATENT = (16, 4, 6)  # channels x height x width: 2 x 3 tokens of 2 x 2 patches, not square
TOKENS = 6  # text tokens per prompt (masked families: some rows shorter)
ITEMS = 4  # cached latents
WIDTH, HEIGHT = 16, 8  # generated image size (a 2x VAE, patch 2): latents 8 x 4


@dataclass(frozen=True)
class Case:
    family: str
    config: str
    block: str  # the transformer's block class: the FSDP unit
    blocks: int
    world_size: int  # of the dry run
    lora_targets: dict[str, int] | None  # LoRA layers per target after injection; None: full-parameter
    # Modules of the last block whose parameters get no or exactly zero gradient (see the module
    # notes): declared by the adapter, frozen in full-parameter training, without LoRA adapters
    gradient_free: tuple[str, ...]


CASES = {
    "qwen_image": Case(
        "qwen_image", "qwen_image_twinflow.yaml", "QwenImageTransformerBlock", 2, 8,
        # the last block's to_add_out and add_q_proj get no adapter (only its discarded text output reads them)
        {"to_q": 2, "to_k": 2, "to_v": 2, "to_out.0": 2, "add_q_proj": 1, "add_k_proj": 2, "add_v_proj": 2, "to_add_out": 1},
        ("transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.norm_added_q",
         "transformer_blocks.1.attn.to_add_out", "transformer_blocks.1.txt_mlp"),
    ),
    "z_image": Case(
        "z_image", "z_image_twinflow.yaml", "ZImageTransformerBlock", 3, 1,  # layers, noise_refiner, context_refiner
        {"to_q": 3, "to_k": 3, "to_v": 3, "to_out.0": 3, "w1": 3, "w2": 3, "w3": 3}, (),
    ),
    "sd3": Case(
        "sd3", "sd35_medium_twinflow.yaml", "JointTransformerBlock", 2, 8, None,
        ("transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.norm_added_q"),
    ),
}

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(*arguments) -> str:
    """``twinflow ARGUMENTS`` in this process; asserts exit 0 and returns what it printed."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        warnings.simplefilter("ignore")  # base folders have no emb_2 yet: copy-initialised
        code = main([str(argument) for argument in arguments])
    assert code == 0, f"{arguments}: exit {code}\n{stdout.getvalue()[-2000:]}\n{stderr.getvalue()[-2000:]}"
    return stdout.getvalue()


def _sets(*overrides: str) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformer folder's safetensors shards."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(str(file))
    return tensors


class Prompts:
    """Random caption embeddings of a family's real text width, deterministic per caption.

    Qwen-Image and Z-Image: ``prompt_embeds`` (B, 6, width) with a mask (rows of 3 to 6 tokens,
    zero-padded); SD3: ``prompt_embeds`` (B, 6, 4096) and ``pooled_prompt_embeds`` (B, 2048).
    """

    def __init__(self, family: str):
        self.family, self.width = family, TEXT_WIDTHS[family]

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = [self._row(caption) for caption in captions]
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    def _row(self, caption: str) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(sum(ord(char) * (index + 1) for index, char in enumerate(caption)))
        embeds = torch.randn(TOKENS, self.width, generator=generator)
        if self.family == "sd3":
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": torch.randn(SD3_POOLED_WIDTH, generator=generator)}
        length = 3 + len(caption) % (TOKENS - 2)
        mask = (torch.arange(TOKENS) < length).long()
        return {"prompt_embeds": embeds * mask[:, None], "prompt_embeds_mask": mask}


class RandomLatents:
    """A captioned "dataset" whose images are already latents of the real channel count."""

    description = "random latents of the real latent channels"

    def __init__(self) -> None:
        self.images = torch.randn(ITEMS, *LATENT, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, indices: torch.Tensor):
        return self.images[indices], [f"caption number {int(index)}" for index in indices]


@dataclass
class World:
    case: Case
    root: Path
    model: Path  # the pipeline folder (model.path)
    cache: Path  # the latent cache (data.root)
    embeddings: Path  # for generate
    base: dict[str, torch.Tensor]  # the transformer's stored weights

    @property
    def recipe(self) -> Path:
        return CONFIGS / self.case.config

    def train_overrides(self) -> list[str]:
        return [
            f"model.path={self.model}", f"data.root={self.cache}", "device=cpu", "phases.0.steps=2",
            "training.batch_size=2", "training.log_every=1", "training.tensorboard=false", "training.progress=false",
        ]


@pytest.fixture(scope="module", params=sorted(CASES))
def world(request, tmp_path_factory, single_thread) -> World:
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(case.family)
    model = build_full_width_folder(root / "model", case.family)
    prompts = Prompts(case.family)
    null_prompt = FAMILIES[case.family].null_prompt
    cache_dataset(RandomLatents(), lambda images: images.clone(), prompts, root / "cache", batch_size=2,
                  progress=False, null_prompt=null_prompt)
    texts = ["a red fox in the snow", "a lighthouse"]
    embeddings = save_embeddings(root / "prompts.safetensors", prompts(texts), texts,
                                 null_condition=prompts([null_prompt]), family=case.family)
    base = _weights(model / "transformer")
    yield World(case, root, model, root / "cache", embeddings, base)
    shutil.rmtree(root, ignore_errors=True)  # several GB of checkpoints and exports
    gc.collect()


# ---- the recipes themselves -----------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(CASES))
def test_recipe_carries_the_reference_settings(family):
    case = CASES[family]
    config = load_config(CONFIGS / case.config)
    (phase,) = config["phases"]
    assert phase["objective"]["preset"] == "twinflow"
    assert phase["objective"]["loss"] == "barron" and phase["objective"]["guidance_ratio"] == 0.8
    training = config["training"]
    assert training["betas"] == [0.9, 0.99] and training["optimizer"] == "adamw"
    assert config["precision"] == "bf16" and training["gradient_checkpointing"] is True
    assert config["model"]["name"] == "diffusers" and config["model"]["family"] == "auto"
    if case.lora_targets is None:  # SD3.5: full-parameter, fp32 master weights
        assert training["lora"] is None and config["model"].get("dtype", "fp32") == "fp32"
    else:
        assert config["model"]["dtype"] == "bf16" and training["lora"]["train_second_embedding"] is True
        assert list(training["lora"]["target_modules"]) == list(case.lora_targets)


# ---- the folder ---------------------------------------------------------------------------


def test_folder_holds_the_released_widths_in_bf16_shards(world):
    config = json.loads((world.model / "transformer" / "config.json").read_text())
    expected = {
        "qwen_image": {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 3584,
                       "in_channels": 64, "out_channels": 16, "patch_size": 2, "num_layers": 2},
        "z_image": {"dim": 3840, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560, "in_channels": 16,
                    "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "n_layers": 1, "n_refiner_layers": 1},
        "sd3": {"num_attention_heads": 24, "attention_head_dim": 64, "joint_attention_dim": 4096,
                "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "in_channels": 16, "out_channels": 16,
                "patch_size": 2, "qk_norm": "rms_norm", "dual_attention_layers": [0], "num_layers": 2,
                "sample_size": 128, "pos_embed_max_size": 32},
    }[world.case.family]
    assert {key: config[key] for key in expected} == expected
    assert all(value.dtype == torch.bfloat16 for value in world.base.values())
    if world.case.family != "sd3":  # released as shards with an index; SD3's 0.35 GB fit one file
        assert (world.model / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    index = json.loads((world.model / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["vae"][0] == "diffusers"
    vae = json.loads((world.model / "vae" / "config.json").read_text())
    assert vae.get("latent_channels", vae.get("z_dim")) == 16  # AutoencoderKL / AutoencoderKLQwenImage


# ---- 1. dry run -------------------------------------------------------------------------------


def test_dry_run_plans_the_family_blocks_and_every_lora_target(world):
    out = world.root / "dry"
    code, stdout, stderr, plan = dry_run(
        world.recipe, out, "--world-size", str(world.case.world_size), *_sets(f"model.path={world.model}"))
    assert code == 0, stderr
    assert not out.exists()
    assert f"{world.case.blocks} x {world.case.block}" in stdout
    assert plan.fsdp_units == {world.case.block: world.case.blocks}
    assert plan.warnings == []  # weight files found (sharded), blocks found
    # the meta model is what the files hold (SD3's positional table is a buffer, not a parameter)
    assert plan.transformer_parameters == sum(v.numel() for k, v in world.base.items() if k != "pos_embed.pos_embed")
    if world.case.lora_targets is None:
        frozen = sum(v.numel() for k, v in world.base.items() if any(k.startswith(f"{m}.") for m in world.case.gradient_free))
        assert frozen > 0 and plan.lora_rank is None and plan.trained_parameters == plan.base_parameters - frozen
        assert plan.base_dtype == "float32" and plan.teacher == "EMA copy"
    else:
        assert plan.lora_targets == world.case.lora_targets and all(plan.lora_targets.values())
        assert plan.lora_rank == load_config(world.recipe)["training"]["lora"]["rank"]
        assert plan.base_dtype == "bfloat16" and plan.teacher == "ema adapter"


# ---- 2. two training steps ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(world) -> Path:
    run = world.root / "run"
    stdout = _run("train", "--config", world.recipe, "--out", run, *_sets(*world.train_overrides()))
    assert "trained 2 steps" in stdout
    return run


def test_two_steps_train_and_leave_a_checkpoint(world, trained):
    assert list_checkpoints(trained) == [checkpoint_folder(trained, 2)]
    final = checkpoint_folder(trained, 2)
    state = json.loads((final / "state.json").read_text())
    # nothing but the overrides differs from the shipped recipe
    assert state["config"] == load_config(world.recipe, world.train_overrides())
    assert state["config"]["training"]["grad_accumulation"] == load_config(world.recipe)["training"]["grad_accumulation"]
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]
    assert all(math.isfinite(row[key]) for row in metrics for key in ("loss", "loss_base", "loss_adversarial", "gradient_norm"))
    weights = load_file(str(final / "model.safetensors"))
    dead = world.case.gradient_free
    if world.case.lora_targets is not None:
        # only the two adapters and emb_2, all float32
        assert all(value.dtype == torch.float32 for value in weights.values())
        prefix = "time_text_embed" if world.case.family == "qwen_image" else "t_embedder"
        assert all("lora_" in key or key.startswith(f"transformer.{prefix}_2.") for key in weights)
        b = {key: value for key, value in weights.items() if ".lora_B." in key}
        assert len(b) == 2 * sum(world.case.lora_targets.values())  # default and ema
        assert all(value.abs().sum() > 0 for value in b.values())  # every adapter trained
        assert not any(key.startswith(f"transformer.{m}.") for key in b for m in dead)
        # emb_2 trained in full (train_second_embedding), away from the copy of emb it started as
        second = {key.removeprefix(f"transformer.{prefix}_2."): value for key, value in weights.items()
                  if key.startswith(f"transformer.{prefix}_2.")}
        assert second and all(not torch.equal(value, world.base[f"{prefix}.{key}"].float()) for key, value in second.items())
    else:
        # every stored tensor moved from the bf16 base, but the buffer and the zero-gradient ones
        assert set(weights) == {f"transformer.{key}" for key in world.base} | {
            key for key in weights if key.startswith("transformer.time_text_embed_2.")}
        unchanged = sorted(key for key, value in world.base.items() if torch.equal(weights[f"transformer.{key}"], value.float()))
        assert unchanged == sorted(["pos_embed.pos_embed"] + [f"{m}.{p}" for m in dead for p in ("weight", "bias")
                                                              if f"{m}.{p}" in world.base])


def test_the_adapter_declares_the_gradient_free_modules(world):
    """What the training test shows never moves is what ``modules_without_gradient`` declares."""
    from twinflow.adapters import load_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load_adapter(world.model, weights=False)
    declared = {name.removeprefix("transformer.") for name in adapter.modules_without_gradient()}
    assert declared == set(world.case.gradient_free)


# ---- 3. export ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(world, trained) -> Path:
    out = world.root / "export"
    extra = ["--dtype", "bf16"] if world.case.lora_targets is None else []
    _run("export", "--checkpoint", trained, "--out", out, "--ema", *extra)
    return out


def test_export_holds_the_ema_weights_and_loads(world, trained, exported):
    from twinflow.adapters import load_adapter, load_lora_export, read_export_metadata

    stored = load_file(str(checkpoint_folder(trained, 2) / "model.safetensors"))
    if world.case.lora_targets is not None:
        assert sorted(path.name for path in exported.iterdir()) == [
            "pytorch_lora_weights.safetensors", "twinflow.json", "twinflow_extra_weights.safetensors"]
        metadata = read_export_metadata(exported)
        assert metadata["weights"] == "ema" and metadata["step"] == 2
        assert metadata["lora"] == load_config(world.recipe)["training"]["lora"]
        lora = load_file(str(exported / "pytorch_lora_weights.safetensors"))
        assert len(lora) == 2 * sum(world.case.lora_targets.values())  # A and B of every adapted layer
        for key, value in lora.items():  # diffusers: transformer.<module>.lora_A.weight; here: transformer.<module>.lora_A.ema.weight
            assert torch.equal(value, stored[key.replace(".weight", ".ema.weight")]), key
        extra = load_file(str(exported / "twinflow_extra_weights.safetensors"))
        assert extra and all(torch.equal(value, stored[f"transformer.{key}"]) for key, value in extra.items())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = load_lora_export(world.model, exported, dtype=torch.bfloat16)
        loaded = {name: module for name, module in adapter.transformer.named_modules() if hasattr(module, "lora_B")}
        assert len(loaded) == sum(world.case.lora_targets.values())
        for name, module in loaded.items():
            (b,) = module.lora_B.values()
            assert torch.equal(b.weight.float(), lora[f"transformer.{name}.lora_B.weight"].to(torch.bfloat16).float()), name
    else:
        assert (exported / "model_index.json").is_file() and (exported / "vae").is_dir()
        metadata = read_export_metadata(exported / "transformer")
        assert metadata["weights"] == "ema" and metadata["dtype"] == "bf16" and metadata["step"] == 2
        ema = load_file(str(checkpoint_folder(trained, 2) / "ema.safetensors"))
        written = _weights(exported / "transformer")
        assert set(written) == {key.removeprefix("transformer.") for key in ema}
        assert all(value.dtype == torch.bfloat16 and torch.equal(value, ema[f"transformer.{key}"].to(torch.bfloat16))
                   for key, value in written.items())
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # emb_2 is in the folder: no copy-initialisation warning
            adapter = load_adapter(exported, dtype=torch.bfloat16)
        for key, value in adapter.second_embedding.state_dict().items():
            assert torch.equal(value, written[f"time_text_embed_2.{key}"])
    del adapter
    gc.collect()


# ---- 4. generate ------------------------------------------------------------------------------


def test_generate_writes_images_of_the_size(world, exported):
    out = world.root / "images"
    model = ["--model", world.model, "--lora", exported] if world.case.lora_targets is not None else ["--model", exported]
    _run("generate", *model, "--embeddings", world.embeddings, "--size", f"{WIDTH}x{HEIGHT}", "--preset", "1nfe",
         "--seed", 3, "--device", "cpu", "--out", out)
    files = sorted(out.glob("*.png"))
    assert [file.name for file in files] == ["0_3.png", "1_4.png"]
    for file in files:
        with Image.open(file) as image:
            assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
            assert np.asarray(image).std() > 0  # not the flat image a NaN or zero output decodes to
