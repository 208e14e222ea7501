"""``twinflow train --dry-run``: the pre-flight plan of the shipped large-model configs.

The model folders hold only a transformer ``config.json`` with the real full-size widths
(Qwen-Image 20B, Z-Image 6B, SD3.5 Medium), so every test checks the actual recipes without a
weight being read: the model is built on the meta device.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
from dry_runs import dry_run

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from twinflow.data import cache_dataset  # noqa: E402
from twinflow.train.config import load_config  # noqa: E402
from twinflow.train.preflight import preflight, transformer_activations  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QWEN, Z_IMAGE, SD35 = (CONFIGS / f"{name}_twinflow.yaml" for name in ("qwen_image", "z_image", "sd35_medium"))
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm",
)


def write_config(folder: Path, class_name: str, **overrides) -> Path:
    """A transformer folder with only config.json: the class's default init arguments (diffusers'
    defaults are the released models' widths for Qwen-Image and Z-Image), then ``overrides``."""
    parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    values = {name: p.default for name, p in parameters.items() if name != "self" and p.default is not p.empty}
    values = {key: list(value) if isinstance(value, tuple) else value for key, value in {**values, **overrides}.items()}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **values}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "qwen": write_config(root / "qwen", "QwenImageTransformer2DModel"),
        "z": write_config(root / "z", "ZImageTransformer2DModel"),
        "sd35": write_config(root / "sd35", "SD3Transformer2DModel", **SD35_MEDIUM),
    }


@pytest.fixture(scope="module")
def qwen_run(folders, tmp_path_factory):
    """The shipped Qwen-Image recipe at 8 processes, through the command line (built once)."""
    root = tmp_path_factory.mktemp("qwen_run")
    code, stdout, stderr, plan = dry_run(QWEN, root / "run", "--world-size", "8", "--set", f"model.path={folders['qwen']}")
    return {"code": code, "stdout": stdout, "stderr": stderr, "plan": plan, "root": root}


@pytest.fixture(scope="module")
def qwen_plan(qwen_run):
    return qwen_run["plan"]


def meta_transformer(folder: Path):
    klass = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    with torch.device("meta"):
        return klass.from_config(klass.load_config(folder))


def test_qwen_image_dry_run_exits_0_and_writes_nothing(qwen_run, folders):
    assert qwen_run["code"] == 0, qwen_run["stderr"]
    stdout = qwen_run["stdout"]
    assert "dry run: 8 process(es), strategy ddp" in stdout and "60 x QwenImageTransformerBlock" in stdout
    assert "total" in stdout and qwen_run["plan"] is not None
    assert list(qwen_run["root"].iterdir()) == []  # no run folder, no checkpoint
    assert sorted(path.name for path in folders["qwen"].iterdir()) == ["config.json"]


def test_qwen_image_plan_numbers_in_closed_form(qwen_plan, folders):
    from twinflow.adapters import build_adapter

    plan = qwen_plan
    transformer = meta_transformer(folders["qwen"])
    size = sum(p.numel() for p in transformer.parameters())
    assert plan.transformer_parameters == size and abs(size - 20.43e9) < 0.01e9  # the real 20B config
    # emb_2 is a copy of Qwen-Image's time embedding
    assert plan.second_embedding_parameters == sum(p.numel() for p in transformer.time_text_embed.parameters())
    assert plan.base_parameters == size + plan.second_embedding_parameters
    assert plan.memory["ddp"].weights == 2 * plan.base_parameters  # the bf16 base

    # LoRA: rank * (in + out) over the matched Linear layers, but those whose output the model
    # discards (the adapter's modules_without_gradient, which apply_lora leaves out)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 starts as a copy
        skipped = {name.removeprefix("transformer.") for name in build_adapter("qwen_image", transformer).modules_without_gradient()}
    layers = [
        module for name, module in transformer.named_modules()
        if any(name == t or name.endswith(f".{t}") for t in targets) and name not in skipped
    ]
    assert all(isinstance(module, torch.nn.Linear) for module in layers) and len(layers) == sum(plan.lora_targets.values())
    assert plan.lora_rank == 64
    assert plan.lora_parameters == sum(64 * (m.in_features + m.out_features) for m in layers)
    # trained: the adapter and emb_2 (train_second_embedding), all fp32; the teacher is the ema adapter
    assert plan.trained_parameters == plan.lora_parameters + plan.second_embedding_parameters
    ddp = plan.memory["ddp"]
    assert ddp.gradients == 4 * plan.trained_parameters
    assert ddp.optimizer == 8 * plan.trained_parameters
    assert ddp.teacher == 4 * plan.lora_parameters and plan.teacher == "ema adapter"
    assert ddp.adapters == 4 * plan.lora_parameters + 2 * plan.second_embedding_parameters  # emb_2 upcast bf16 -> fp32
    assert ddp.gathered == 0 and ddp.buffers == 0

    # batch and slices: 8 over 8 processes, 4 micro-steps; 32 samples hold 8 periods of 1:1:1:1
    assert (plan.per_process_batch, plan.samples_per_step) == (1, 32)
    (phase,) = plan.slices
    assert phase.period == 4 and phase.whole_periods and phase.rotation_steps == 1
    assert phase.step_window == {"one_step": 8, "multi_step": 8, "any_step": 8, "fake": 8}
    assert sum(phase.micro_batch.values()) == 1
    assert plan.fsdp_units == {"QwenImageTransformerBlock": 60}

    # no data here: activations at the family default, 166x166 latents and 512 text tokens
    activations = plan.activations
    assert activations.latent_shape == (16, 166, 166) and activations.tokens == 83 * 83 + 512
    assert activations.per_sample == transformer_activations(83 * 83 + 512, 3072, 60, 2, True)[0]
    assert ddp.activations == activations.per_sample + 2 * activations.no_grad_per_sample
    assert ddp.total == pytest.approx(sum(ddp.parts.values()))


def test_fsdp_divides_the_sharded_parts_by_the_processes(qwen_plan, folders):
    full = preflight(load_config(SD35, [f"model.path={folders['sd35']}"]), 8)  # full-parameter, EMA copy
    for plan in (qwen_plan, full):
        ddp, fsdp = plan.memory["ddp"], plan.memory["fsdp"]
        for part in ("weights", "adapters", "gradients", "optimizer"):
            assert fsdp.parts[part] == pytest.approx(ddp.parts[part] / 8), part
        assert fsdp.buffers == ddp.buffers and fsdp.activations == ddp.activations
        assert ddp.gathered == 0 and fsdp.gathered == plan.gathered_bytes > 0
    # the LoRA teacher is an adapter (sharded); the full-parameter one a weight-sized copy
    assert qwen_plan.memory["fsdp"].teacher == pytest.approx(qwen_plan.memory["ddp"].teacher / 8)
    assert full.teacher == "EMA copy" and full.buffer_bytes > 0  # SD3's positional table
    assert full.memory["ddp"].teacher == full.base_bytes + full.buffer_bytes
    assert full.memory["fsdp"].teacher == pytest.approx(full.base_bytes / 8 + full.buffer_bytes)
    # gathered for the whole objective, in bf16 (precision: bf16): the model and its EMA copy in full
    assert full.gathered_bytes == 2 * full.base_parameters * 2
    assert qwen_plan.gathered_bytes == 2 * (qwen_plan.base_parameters + 2 * qwen_plan.lora_parameters)
    assert full.base_dtype == "float32" and full.memory["ddp"].weights == 4 * full.base_parameters


def test_a_batch_that_does_not_split_over_the_processes_exits_2(folders, tmp_path):
    code, _, stderr, _ = dry_run(QWEN, tmp_path / "run", "--world-size", "3", "--set", f"model.path={folders['qwen']}")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "training.batch_size" in stderr and "Traceback" not in stderr


def test_a_missing_lora_target_module_exits_2_naming_it(folders, tmp_path):
    code, _, stderr, _ = dry_run(
        QWEN, tmp_path / "run", "--world-size", "8", "--set", f"model.path={folders['qwen']}",
        "--set", "training.lora.target_modules=[to_q, not_a_module]",
    )
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "not_a_module" in stderr and "training.lora.target_modules" in stderr and "to_add_out" in stderr  # similar names
    code, _, stderr, _ = dry_run(
        QWEN, tmp_path / "run", "--world-size", "8", "--set", f"model.path={folders['qwen']}",
        "--set", "training.lora.target_modules=[to_qq]",
    )
    assert code == 2 and "'to_qq' not found" in stderr and "'to_q'" in stderr
    assert not (tmp_path / "run").exists()


def test_the_shipped_z_image_and_sd35_medium_recipes_pass(folders, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    code, stdout, stderr, z_image = dry_run(Z_IMAGE, out, "--world-size", "1", "--set", f"model.path={folders['z']}")
    assert code == 0, stderr
    assert "34 x ZImageTransformerBlock" in stdout and "strategy none" in stdout
    size = sum(p.numel() for p in meta_transformer(folders["z"]).parameters())
    assert z_image.transformer_parameters == size and abs(size - 6.15e9) < 0.01e9  # the real 6B config
    assert list(z_image.memory) == ["none"]

    code, stdout, stderr, sd35 = dry_run(SD35, out, "--world-size", "8", "--set", f"model.path={folders['sd35']}")
    assert code == 0, stderr
    assert "24 x JointTransformerBlock" in stdout and "= 4 per process" in stdout
    assert abs(sd35.transformer_parameters - 2.24e9) < 0.01e9  # + a 0.23B positional table (a buffer)
    # full-parameter: all but the last block's text queries, which get exactly zero gradient (frozen)
    attention = 1536 * 1536 + 1536 + 64  # add_q_proj and the RMSNorm weight of its head dimension
    assert sd35.trained_parameters == sd35.base_parameters - attention and sd35.lora_rank is None
    assert [path.name for path in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "untouched"


def test_world_size_from_the_environment_and_the_strategy_it_needs(folders, tmp_path, monkeypatch):
    cheap = ["--set", f"model.path={folders['z']}", "--set", "training.lora.target_modules=[to_q]"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, stdout, stderr, _ = dry_run(Z_IMAGE, tmp_path / "run", *cheap, "--set", "distributed.strategy=fsdp")
    assert code == 0, stderr
    assert "dry run: 4 process(es), strategy fsdp" in stdout and "2 per process" in stdout
    code, _, stderr, _ = dry_run(Z_IMAGE, tmp_path / "run", *cheap)  # no distributed section: 'none'
    assert code == 2 and "distributed.strategy" in stderr and len(stderr.strip().splitlines()) == 1


class Latents:
    """Eight captioned 'images' that are already latents (the identity is the VAE)."""

    def __init__(self, channels: int):
        self.images = torch.zeros(8, channels, 8, 12)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, indices):
        return self.images[indices], [f"caption {int(i)}" for i in indices]


def _prompts(captions: list[str]) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": torch.zeros(len(captions), 7, 16), "prompt_embeds_mask": torch.ones(len(captions), 7, dtype=torch.long)}


def test_a_latent_cache_gives_the_activation_shapes(folders, tmp_path):
    cache = cache_dataset(Latents(16), lambda images: images.clone(), _prompts, tmp_path / "cache", progress=False)
    index = (tmp_path / "cache" / "index.json").read_text()
    # full-parameter (no LoRA to inject): the data checks are what this test is about
    options = [f"--set=model.path={folders['qwen']}", "--set=training.lora=null", "--set=model.dtype=fp32", "--world-size=8"]
    code, _, stderr, plan = dry_run(QWEN, tmp_path / "run", *options, f"--set=data.root={cache.root}")
    assert code == 0, stderr
    assert plan.activations.latent_shape == (16, 8, 12) and plan.activations.source == "data.root"
    assert plan.activations.tokens == 4 * 6 + 7  # 2 x 2 patches + the cached prompt length
    code, _, stderr, plan = dry_run(QWEN, tmp_path / "run", *options, f"--set=data.root={cache.root}", "--latent-size=64x96")
    assert code == 0, stderr
    assert plan.activations.latent_shape == (16, 64, 96) and plan.activations.tokens == 32 * 48 + 7
    assert (tmp_path / "cache" / "index.json").read_text() == index and not (tmp_path / "run").exists()

    wrong = cache_dataset(Latents(4), lambda images: images.clone(), _prompts, tmp_path / "wrong", progress=False)
    code, _, stderr, _ = dry_run(QWEN, tmp_path / "run", *options, f"--set=data.root={wrong.root}")
    assert code == 2 and "data.root" in stderr and "16 channels" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr, _ = dry_run(QWEN, tmp_path / "run", *options, "--latent-size", "63x64")
    assert code == 2 and "--latent-size" in stderr


def test_a_u_net_config_and_an_fsdp_model_without_blocks(tmp_path, monkeypatch):
    tiny = CONFIGS / "tiny.yaml"
    code, stdout, stderr, plan = dry_run(tiny, tmp_path / "run", "--world-size=2", "--set=distributed.strategy=fsdp")
    assert code == 0, stderr
    assert "model: UNet" in stdout and "activations (not estimated)" in stdout and plan.activations is None
    # fp32: the model and its EMA copy gathered as stored
    assert plan.memory["fsdp"].gathered == 2 * plan.base_bytes == 8 * plan.base_parameters and not plan.warnings

    import twinflow.train.distributed as distributed

    monkeypatch.setattr(distributed, "repeated_blocks", lambda model: [])
    code, stdout, stderr, plan = dry_run(tiny, tmp_path / "run", "--world-size=2", "--set=distributed.strategy=fsdp")
    assert code == 0 and plan.fsdp_units == {} and "warning: FSDP: the model has no repeated blocks" in stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("device", "native", "planned"), [("cuda", False, "bf16"), ("cpu", True, "bf16"), ("cpu", False, "fp32")])
def test_precision_auto_is_planned_as_the_launch_would_resolve_it(tmp_path, monkeypatch, device, native, planned):
    """A dry run plans GPUs it usually does not have: ``auto`` is bf16 there; on the CPU it is
    bf16 only where the CPU computes it natively. The gathered FSDP weights follow (2 or 4 bytes)."""
    import twinflow.train.preflight as preflight_module

    monkeypatch.setattr(preflight_module, "native_bf16", lambda cpu: native)
    code, stdout, stderr, plan = dry_run(
        CONFIGS / "tiny.yaml", tmp_path / "run", "--world-size=2", "--set=distributed.strategy=fsdp",
        "--set=precision=auto", f"--set=device={device}",
    )
    assert code == 0, stderr
    assert plan.precision == planned and f"precision {planned}" in stdout
    assert plan.memory["fsdp"].gathered == 2 * (2 if planned == "bf16" else 4) * plan.base_parameters
