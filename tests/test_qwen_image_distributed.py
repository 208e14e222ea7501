"""Qwen-Image under DDP and FSDP2, with the shipped recipe, on 2 gloo processes.

Qwen-Image's last block computes text-stream outputs that its ``forward`` discards, so the
parameters of ``attn.to_add_out`` and ``txt_mlp`` there never get a gradient; a DDP run with
``find_unused_parameters=False`` that trains them fails at its second step. The adapter declares
those modules (:meth:`~twinflow.adapters.QwenImageAdapter.modules_without_gradient`): LoRA leaves
them out and full-parameter training freezes them. These tests check the declaration against a
real backward for every family, train Qwen-Image LoRA (``to_add_out`` among the targets) under
DDP, and run ``configs/qwen_image_twinflow.yaml`` under ``torchrun`` as a user would, one sample
per process, with ``ddp`` and with ``fsdp``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from spawn import WORLD, spawn, train_under_torchrun

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tiny_text_to_image import TINY, write_captioned_images, write_tiny_cache  # noqa: E402

from twinflow.adapters import build_adapter  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.testing import ADAPTER_FAMILIES, BUILDERS, build_tiny_folder  # noqa: E402
from twinflow.train.checkpoint import checkpoint_folder  # noqa: E402
from twinflow.train.config import load_config  # noqa: E402
from twinflow.train.loop import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "qwen_image_twinflow.yaml"
TARGETS = "[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out]"


def _inputs(family: str):
    """A batch of two for the tiny transformer of ``family`` (tiny_text_to_image widths)."""
    generator = torch.Generator().manual_seed(0)
    if family == "sd3":
        return torch.randn(2, 4, 8, 8, generator=generator), {
            "prompt_embeds": torch.randn(2, 3, 32, generator=generator), "pooled_prompt_embeds": torch.randn(2, 32, generator=generator)}
    condition = {"prompt_embeds": torch.randn(2, 3, 16, generator=generator)}
    if family == "flux":
        condition["pooled_prompt_embeds"] = torch.randn(2, 16, generator=generator)
    return torch.randn(2, 4, 4, 4, generator=generator), condition


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_declared_gradient_free_modules_are_exactly_those_without_gradient(family):
    """Every tiny builder, the edit pipelines' transformers (Edit-2511: zero_cond_t) with a source image too."""
    torch.manual_seed(0)
    adapter_family = ADAPTER_FAMILIES.get(family, family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = build_adapter(adapter_family, BUILDERS[family](False)["transformer"])
    x, condition = _inputs(adapter_family)
    if adapter_family != family:  # an edit: the source's latents join the sequence
        condition["image_latents"] = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # a second embedding that differs from the first: every path carries signal
        for parameter in adapter.second_embedding.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    adapter(x, torch.tensor([0.7, 0.5]), torch.tensor([0.2, 0.5]), condition).square().mean().backward()
    # no gradient, or exactly zero (the last block's text queries: only its discarded text output reads them)
    without = {name for name, parameter in adapter.named_parameters() if parameter.grad is None or not parameter.grad.any()}
    declared = {name for module in adapter.modules_without_gradient()
                for name, _ in adapter.get_submodule(module).named_parameters(prefix=module)}
    assert without == declared
    assert bool(declared) == (adapter_family in ("qwen_image", "sd3"))


# ---- DDP LoRA with to_add_out: 2 processes, 4 samples each ------------------------------------


def _ddp_worker(rank: int, root: Path, config: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config, root / "run")


@pytest.fixture(scope="module")
def qwen_transformer(tmp_path_factory) -> Path:
    """A random 2-block Qwen-Image transformer of the tiny cache's widths (latents 4 x 8 x 8, text 16)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qwen") / "transformer"
    BUILDERS["qwen_image"](False)["transformer"].save_pretrained(folder)
    return folder


def test_ddp_lora_on_qwen_image_with_to_add_out_trains(qwen_transformer, tmp_path):
    cache = write_tiny_cache(tmp_path / "cache")
    config = load_config(TINY, [
        f"model.path={qwen_transformer}", f"data.root={cache}", "training.batch_size=8", "distributed.strategy=ddp",
        f"training.lora={{rank: 4, alpha: 8, target_modules: {TARGETS}}}", "phases.0.steps=3",
        "training.checkpoint_every=0",
    ])
    spawn(_ddp_worker, tmp_path, config)
    state = json.loads((checkpoint_folder(tmp_path / "run", 3) / "state.json").read_text())
    assert state["distributed"] == {"strategy": "ddp", "world_size": 2}
    weights = load_file(str(checkpoint_folder(tmp_path / "run", 3) / "model.safetensors"))
    # every block's to_add_out and add_q_proj has an adapter but the last one's, and the trained ones moved
    assert not any("transformer_blocks.1.attn.to_add_out" in key or "transformer_blocks.1.attn.add_q_proj" in key for key in weights)
    trained = [value for key, value in weights.items() if "transformer_blocks.0.attn.to_add_out.lora_B.default" in key]
    assert trained and all(value.abs().sum() > 0 for value in trained)


# ---- the shipped recipe under torchrun, one sample per process ---------------------------------


@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen-Image pipeline folder and the latent cache `twinflow cache` writes from it."""
    root = tmp_path_factory.mktemp("recipe")
    pipeline = build_tiny_folder(root / "qwen_image", "qwen_image")
    images = write_captioned_images(root / "images", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["cache", "--model", str(pipeline), "--data", str(images), "--size", "16",
                     "--out", str(root / "cache"), "--device", "cpu"]) == 0
    return pipeline, root / "cache"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_shipped_qwen_image_recipe_runs_under_torchrun_with_one_sample_per_process(recipe_inputs, strategy, tmp_path):
    pipeline, cache = recipe_inputs
    out = tmp_path / "run"
    overrides = [f"model.path={pipeline}", f"data.root={cache}", "device=cpu", "phases.0.steps=2",
                 f"training.batch_size={WORLD}"]
    if strategy == "fsdp":
        overrides.append("distributed.strategy=fsdp")  # the recipe says ddp
    finished = train_under_torchrun(RECIPE, out, overrides)
    assert f"{strategy}: 2 processes, 1 sample each per micro-step" in finished.stdout
    final = checkpoint_folder(out, 2)
    state = json.loads((final / "state.json").read_text())
    assert state["distributed"] == {"strategy": strategy, "world_size": 2}
    # the recipe's 4 accumulation micro-steps x 2 processes x 1 sample: every slice twice per step
    assert state["config"]["training"]["grad_accumulation"] == 4
    assert (final / "model.safetensors").is_file() or (final / "sharded").is_dir()
