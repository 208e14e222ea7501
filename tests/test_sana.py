"""Sana (SanaTransformer2DModel, SanaPipeline) through the shared adapter, family, cache, loop,
export and generate code, on tiny random models built offline (issue 16).

The adapter's r = t exactness is in tests/test_adapters.py (Sana is one of its families), and
the prompt-caching-equals-generation test in tests/test_generation.py; here: what only Sana has
(the tuple time embedding, the guidance variant, the reference's ``time_embed_2`` weights,
the complex human instruction, the DC-AE latents) and the command-line path end to end.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_text_to_image import write_captioned_images  # noqa: E402

from twinflow.adapters import SANA_TIME, build_adapter, load_adapter, read_export_metadata  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.data.encoders import vae_encoder  # noqa: E402
from twinflow.families import FAMILIES  # noqa: E402
from twinflow.families.sana import default_instruction  # noqa: E402
from twinflow.generation import TextToImage  # noqa: E402
from twinflow.testing import build_tiny_folder  # noqa: E402
from twinflow.train.checkpoint import checkpoint_folder, list_checkpoints  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_text_to_image.yaml"
SIZE = 16  # pixels: the tiny DC-AE halves them; one latent pixel per token
PROMPT = "a red fox in the snow"
FAMILY = FAMILIES["sana"]


def _transformer(**options):
    torch.manual_seed(0)
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1, **options,
    ).eval()


def _adapter(transformer, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copy-initialised emb_2
        return build_adapter("sana", transformer, **options)


def _perturb(module, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _inputs(batch=3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[0, -2:] = 0
    return x, {"prompt_embeds": torch.randn(batch, 5, 16, generator=generator), "prompt_embeds_mask": mask}


# -- the adapter -------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [False, True])
def test_both_outputs_of_the_time_embedding_get_the_second_term(guidance):
    """(mod, emb) = time_embed(1000 t) + time_embed_2(1000 r) * (t - r), element by element, as the
    reference's transformer_sana.py; also on the guidance-embedding variant."""
    adapter = _adapter(_transformer(guidance_embeds=guidance))
    _perturb(adapter.second_embedding)
    wrapper = adapter.time_embedding
    t, r = torch.tensor([0.8, -0.6, 0.3]), torch.tensor([0.2, -0.1, 0.0])
    extra = {"guidance": torch.full((3,), 4.0)} if guidance else {"batch_size": 3}
    with torch.no_grad():
        plain = wrapper.first(t * 1000, hidden_dtype=torch.float32, **extra)
        second = wrapper.second(r * 1000, hidden_dtype=torch.float32, **extra)
        with wrapper.target(t, r):
            combined = wrapper.first(t * 1000, hidden_dtype=torch.float32, **extra)
    assert isinstance(combined, tuple) and len(combined) == 2
    assert combined[0].shape == (3, 6 * 16) and combined[1].shape == (3, 16)
    for got, first, other in zip(combined, plain, second):
        torch.testing.assert_close(got, first + other * (t - r)[:, None], atol=1e-5, rtol=1e-5)
    assert SANA_TIME.model_time(t).tolist() == (t * 1000).tolist()


def test_guidance_variant_equals_the_unmodified_model_and_needs_its_guidance():
    transformer = _transformer(guidance_embeds=True)
    original = __import__("copy").deepcopy(transformer)
    adapter = _adapter(transformer)
    x, condition = _inputs()
    guidance = torch.full((3,), 4.5)
    times = torch.tensor([0.9, 0.5, 1.0])
    with torch.no_grad():
        expected = original(x, encoder_hidden_states=condition["prompt_embeds"], timestep=times * 1000,
                            guidance=guidance, encoder_attention_mask=condition["prompt_embeds_mask"], return_dict=False)[0]
        assert torch.equal(adapter(x, times, times, {**condition, "guidance": guidance}), expected)
    with pytest.raises(ValueError, match="guidance_embeds: its condition needs 'guidance'"):
        adapter(x, times, times, condition)
    with pytest.raises(ValueError, match="only for a Sana transformer with guidance_embeds"):
        _adapter(_transformer())(x, times, times, {**condition, "guidance": guidance})


def test_sana_sprint_is_refused_by_name():
    with pytest.raises(ValueError, match="timestep_scale 1000.0 .*SANA-Sprint"):
        _adapter(_transformer(timestep_scale=1000.0))


def test_the_reference_time_embed_2_weights_load_as_they_are(tmp_path):
    """The reference adds time_embed_2 = AdaLayerNormSingle(inner_dim), normal(0, 0.02) weights and
    zero biases; a transformer folder holding such keys loads them bitwise, and they act."""
    from diffusers.models.normalization import AdaLayerNormSingle

    transformer = _transformer()
    transformer.save_pretrained(tmp_path / "transformer")
    torch.manual_seed(5)
    reference = AdaLayerNormSingle(16)
    for module in reference.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            torch.nn.init.constant_(module.bias, 0)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    stored = load_file(str(weights))
    released = {f"time_embed_2.{key}": value for key, value in reference.state_dict().items()}
    save_file({**stored, **released}, str(weights))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained emb_2 found: no copy-initialisation warning
        adapter = load_adapter(tmp_path / "transformer")
    state = adapter.transformer.state_dict()
    assert released and all(torch.equal(state[key], value) for key, value in released.items())
    copied = _adapter(_transformer())
    x, condition = _inputs()
    t, r = torch.tensor([0.9, 0.6, 1.0]), torch.tensor([0.3, 0.0, 0.0])
    with torch.no_grad():
        assert torch.equal(adapter(x, t, t, condition), copied(x, t, t, condition))  # r = t: emb_2 unused
        assert not torch.allclose(adapter(x, t, r, condition), copied(x, t, r, condition), atol=1e-4)


# -- the family: prompts and latents as SanaPipeline makes them -----------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana")
    return {
        "extra": build_tiny_folder(root / "extra", "sana", extra_weights=True),
        "base": build_tiny_folder(root / "base", "sana"),
    }


@pytest.fixture(scope="module")
def pipeline(folders):
    return diffusers.SanaPipeline.from_pretrained(folders["base"])


def test_prompts_carry_the_pipelines_complex_human_instruction_and_the_null_prompt_does_not(pipeline):
    instruction = default_instruction(pipeline)
    assert instruction and instruction[0].startswith("Given a user prompt")  # __call__'s default
    device = torch.device("cpu")
    prompts = ["a red fox in the snow", "fruit"]
    condition = FAMILY.encode(pipeline, prompts, device)
    embeds, mask, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                complex_human_instruction=instruction)
    assert torch.equal(condition["prompt_embeds"], embeds) and torch.equal(condition["prompt_embeds_mask"], mask)
    assert condition["prompt_embeds"].shape[1] == 300  # padded to max_sequence_length, with the mask
    plain, _, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
    assert not torch.equal(plain, embeds)  # the instruction changes what the transformer sees
    # The null condition is SanaPipeline.__call__'s negative prompt: "" without the instruction.
    _, _, negative, negative_mask = pipeline.encode_prompt(prompts[:1], do_classifier_free_guidance=True,
                                                           device=device, complex_human_instruction=instruction)
    null = FAMILY.encode_null(pipeline, device)
    assert torch.equal(null["prompt_embeds"], negative) and torch.equal(null["prompt_embeds_mask"], negative_mask)


def test_dc_ae_latents_both_ways_as_the_pipeline(pipeline):
    vae = pipeline.vae
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae_encoder(vae)(images)
        torch.testing.assert_close(latents, vae.encode(images).latent * vae.config.scaling_factor, rtol=0, atol=0)
        decoded = FAMILY.decode(pipeline, latents)
        expected = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]  # SanaPipeline.__call__
    assert torch.equal(decoded, expected)
    assert vae_encoder(vae).description["latent"] == "deterministic encoder output"
    assert pipeline.vae_scale_factor == 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    assert FAMILY.latent_shape(pipeline, pipeline.transformer, 24, 16) == (4, 8, 12)
    with pytest.raises(ValueError, match="not divisible by 2"):
        FAMILY.latent_shape(pipeline, pipeline.transformer, 25, 16)


def test_generate_at_one_and_two_steps_with_and_without_extra_weights(folders):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained = TextToImage.from_pretrained(folders["extra"], device="cpu")
    with pytest.warns(UserWarning, match="initialised as a copy"):
        plain = TextToImage.from_pretrained(folders["base"], device="cpu")
    images = {}
    for name, pipe in (("extra", trained), ("base", plain)):
        for preset in ("1nfe", "2nfe"):
            result = pipe.generate([PROMPT], preset=preset, width=24, height=16, seed=3, progress=False)
            assert result.network_calls == int(preset[0]) and result.images[0].size == (24, 16)
            images[name, preset] = np.asarray(result.images[0], dtype=np.int16)
    assert not np.array_equal(images["extra", "1nfe"], images["extra", "2nfe"])
    # The two folders hold the same base weights; only the extra weights differ, and they act.
    assert not np.array_equal(images["extra", "2nfe"], images["base", "2nfe"])


# -- the command line, end to end ------------------------------------------------------------


def _run(*arguments) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(argument) for argument in arguments]) == 0, arguments


def _train(base: Path, cache: Path, run: Path, *overrides: str) -> None:
    sets = [f"model.path={base / 'transformer'}", f"data.root={cache}", "training.learning_rate=1e-2", *overrides]
    _run("train", "--config", TINY, "--out", run, *[item for value in sets for item in ("--set", value)])


def test_cache_train_resume_export_generate_full_and_lora(folders, tmp_path):
    base = folders["base"]
    images = write_captioned_images(tmp_path / "images", 6, (20, 18), broken=True)  # not square: centre-cropped
    cache = tmp_path / "cache"
    _run("cache", "--model", base, "--data", images, "--size", SIZE, "--out", cache, "--batch-size", 4, "--device", "cpu")
    null = load_file(str(cache / "null_condition.safetensors"))
    assert int(null["prompt_embeds_mask"].sum()) == 0  # "" without the instruction (the tiny tokenizer adds no BOS)

    # Full parameters: 4 steps uninterrupted == 2 steps, stop, resume to 4 (bitwise).
    uninterrupted, resumed = tmp_path / "run", tmp_path / "resumed"
    _train(base, cache, uninterrupted)
    _train(base, cache, resumed)
    shutil.rmtree(checkpoint_folder(resumed, 4))
    assert list_checkpoints(resumed)[-1] == checkpoint_folder(resumed, 2)
    _run("train", "--out", resumed, "--resume")
    for name in ("model.safetensors", "ema.safetensors"):
        expected, got = (load_file(str(checkpoint_folder(run, 4) / name)) for run in (uninterrupted, resumed))
        assert expected.keys() == got.keys() and any(key.startswith("transformer.time_embed_2.") for key in got)
        assert all(torch.equal(got[key], value) for key, value in expected.items()), name

    export = tmp_path / "export"
    _run("export", "--checkpoint", uninterrupted, "--out", export)
    assert read_export_metadata(export / "transformer")["step"] == 4
    outputs = {}
    for name, folder, extra in (("full", export, ()), ("base", base, ())):
        out = tmp_path / f"images_{name}"
        _run("generate", "--model", folder, "--prompt", PROMPT, "--size", f"{SIZE}x{SIZE}", "--preset", "1nfe",
             "--seed", 7, "--device", "cpu", "--out", out, *extra)
        outputs[name] = np.asarray(Image.open(out / "0_7.png"), dtype=np.int16)
    assert outputs["full"].shape == (SIZE, SIZE, 3) and not np.array_equal(outputs["full"], outputs["base"])

    # LoRA: only the adapter trains; its export applies to the base pipeline with --lora.
    lora_run, lora_export = tmp_path / "lora", tmp_path / "lora_export"
    _train(base, cache, lora_run, "training.lora={rank: 4, alpha: 8, target_modules: [to_q, to_k, to_v, to_out.0]}",
           "phases.0.steps=2")
    _run("export", "--checkpoint", lora_run, "--out", lora_export)
    out = tmp_path / "images_lora"
    _run("generate", "--model", base, "--lora", lora_export, "--prompt", PROMPT, "--size", f"{SIZE}x{SIZE}",
         "--preset", "1nfe", "--seed", 7, "--device", "cpu", "--out", out)
    with_lora = np.asarray(Image.open(out / "0_7.png"), dtype=np.int16)
    assert not np.array_equal(with_lora, outputs["base"])


# -- the shipped recipes at Sana 1.6B's real widths (meta device, nothing allocated) ----------


@pytest.mark.parametrize("recipe, sample_size, world_size", [
    ("sana_1600m_512_twinflow.yaml", 16, 8),  # full-parameter, DDP over 8 GPUs
    ("sana_1600m_1024_twinflow.yaml", 32, 1),  # LoRA on one GPU
])
def test_the_recipes_plan_sana_1600m(recipe, sample_size, world_size, tmp_path):
    """diffusers' SanaTransformer2DModel defaults are Sana 1.6B's (20 blocks of 70 x 32 heads,
    cross-attention 20 x 112, Gemma-2 2304, 32 latent channels); the dry run builds it on the
    meta device from config.json and plans the recipe's 20 blocks and LoRA targets."""
    from dry_runs import dry_run

    from twinflow.train.config import load_config

    with torch.device("meta"):
        transformer = diffusers.SanaTransformer2DModel(sample_size=sample_size)
    transformer.save_config(tmp_path / "model" / "transformer")
    code, stdout, stderr, plan = dry_run(ROOT / "configs" / recipe, tmp_path / "dry", "--world-size", str(world_size),
                                         "--set", f"model.path={tmp_path / 'model'}")
    assert code == 0, stderr
    # FSDP units: what diffusers marks unsplittable (_no_split_modules): the blocks and the patch embedding
    assert "20 x SanaTransformerBlock" in stdout and plan.fsdp_units == {"SanaTransformerBlock": 20, "PatchEmbed": 1}
    parameters = sum(p.numel() for p in transformer.parameters())
    assert 1.5e9 < parameters < 1.7e9 and plan.transformer_parameters == parameters
    config = load_config(ROOT / "configs" / recipe)
    objective = config["phases"][0]["objective"]
    assert (objective["loss"], objective["guidance_ratio"], objective["rectify_coefficient"]) == ("barron", 0.8, 0.75)
    assert config["training"]["betas"] == [0.9, 0.95]  # the reference's OpenUni runs
    if config["training"]["lora"] is None:
        assert plan.lora_rank is None and plan.teacher == "EMA copy"
    else:  # attn1 (linear self-attention) and attn2 (cross-attention) of each of the 20 blocks
        assert plan.lora_targets == {"to_q": 40, "to_k": 40, "to_v": 40, "to_out.0": 40}
        assert plan.lora_rank == 64 and plan.teacher == "ema adapter"
