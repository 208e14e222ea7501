"""diffusers transformers as TwinFlow backbones (twinflow.adapters), on tiny random models.

Every family is checked against the unmodified diffusers model called the way its pipeline
calls it (packing, time scaling and direction included), so the adapter's conventions are
tested against diffusers' own, not against themselves.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")

from twinflow.adapters import (  # noqa: E402
    ADAPTERS,
    FLUX_TIME,
    QWEN_IMAGE_TIME,
    SD3_TIME,
    Z_IMAGE_TIME,
    TargetTimeEmbedding,
    TimeConvention,
    adapter_for,
    build_adapter,
    extra_state_dict,
    family_of,
    find_extra_weights,
    load_adapter,
    load_extra_weights,
    save_extra_weights,
)
from twinflow.objective import TwinFlowObjective, objective_config  # noqa: E402
from twinflow.sampler import sample, sampler_config  # noqa: E402
from twinflow.teacher import EMATeacher  # noqa: E402
from twinflow.testing import initialised  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH, CHANNELS, SIZE, TEXT_LENGTH = 4, 4, 8, 5
VAE_SCALE = 8  # the pipelines' unpacking helpers take pixel sizes


# -- tiny models of every family and their reference calls ----------------------------------


@dataclass
class Family:
    name: str
    make: Callable[[], torch.nn.Module]
    condition: Callable[[int, torch.Generator], dict]
    reference: Callable  # (unmodified transformer, x, t, condition) -> velocity, pipeline-style


def _text(batch, generator, width=16):
    return torch.randn(batch, TEXT_LENGTH, width, generator=generator)


def _mask(batch):
    mask = torch.ones(batch, TEXT_LENGTH, dtype=torch.long)
    mask[0, -2:] = 0  # padding on one sample
    return mask


def _qwen_reference(transformer, x, t, condition):
    from diffusers import QwenImagePipeline

    batch, channels, height, width = x.shape
    tokens = transformer(
        hidden_states=QwenImagePipeline._pack_latents(x, batch, channels, height, width),
        encoder_hidden_states=condition["prompt_embeds"],
        encoder_hidden_states_mask=condition["prompt_embeds_mask"],
        timestep=t,  # the pipeline passes sigma = timestep / 1000
        img_shapes=[[(1, height // 2, width // 2)]] * batch,
        return_dict=False,
    )[0]
    return QwenImagePipeline._unpack_latents(tokens, height * VAE_SCALE, width * VAE_SCALE, VAE_SCALE).squeeze(2)


def _z_image_reference(transformer, x, t, condition):
    embeds, mask = condition["prompt_embeds"], condition["prompt_embeds_mask"]
    captions = [embed[keep.bool()] for embed, keep in zip(embeds, mask)]  # the pipeline drops padding
    outputs = transformer(list(x.unsqueeze(2).unbind(0)), 1 - t, captions, return_dict=False)[0]
    return -torch.stack(outputs).squeeze(2)  # ZImagePipeline: t' = 1 - sigma, velocity = -output


def _sd3_reference(transformer, x, t, condition):
    return transformer(
        hidden_states=x,
        encoder_hidden_states=condition["prompt_embeds"],
        pooled_projections=condition["pooled_prompt_embeds"],
        timestep=t * 1000,  # the scheduler's timesteps are 1000 sigma
        return_dict=False,
    )[0]


def _flux_reference(transformer, x, t, condition):
    from diffusers import FluxPipeline

    batch, channels, height, width = x.shape
    tokens = transformer(
        hidden_states=FluxPipeline._pack_latents(x, batch, channels, height, width),
        encoder_hidden_states=condition["prompt_embeds"],
        pooled_projections=condition["pooled_prompt_embeds"],
        timestep=t,  # the pipeline passes timestep / 1000
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype),
        txt_ids=torch.zeros(TEXT_LENGTH, 3),
        guidance=condition["guidance"],
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(tokens, height * VAE_SCALE, width * VAE_SCALE, VAE_SCALE)


def _sana_reference(transformer, x, t, condition):
    return transformer(
        x,
        encoder_hidden_states=condition["prompt_embeds"],
        encoder_attention_mask=condition["prompt_embeds_mask"],
        timestep=t * 1000,  # SanaPipeline: the scheduler's 1000 sigma, times timestep_scale = 1
        return_dict=False,
    )[0]


def _sana(**options):
    return diffusers.SanaTransformer2DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=SIZE, patch_size=1, **options,
    )


FAMILIES = {
    "sana": Family(
        "sana",
        _sana,
        lambda batch, generator: {"prompt_embeds": _text(batch, generator), "prompt_embeds_mask": _mask(batch)},
        _sana_reference,
    ),
    "qwen_image": Family(
        "qwen_image",
        lambda **options: diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * CHANNELS, out_channels=CHANNELS, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), **options,
        ),
        lambda batch, generator: {"prompt_embeds": _text(batch, generator), "prompt_embeds_mask": _mask(batch)},
        _qwen_reference,
    ),
    "z_image": Family(
        "z_image",
        lambda: initialised(diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=CHANNELS, dim=32, n_layers=2,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32],
        )),
        lambda batch, generator: {"prompt_embeds": _text(batch, generator), "prompt_embeds_mask": _mask(batch)},
        _z_image_reference,
    ),
    "sd3": Family(
        "sd3",
        lambda: diffusers.SD3Transformer2DModel(
            sample_size=SIZE, patch_size=2, in_channels=CHANNELS, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
            out_channels=CHANNELS, pos_embed_max_size=16,
        ),
        lambda batch, generator: {
            "prompt_embeds": _text(batch, generator),
            "pooled_prompt_embeds": torch.randn(batch, 16, generator=generator),
        },
        _sd3_reference,
    ),
    "flux": Family(  # guidance-distilled, so the embedding takes (timestep, guidance, pooled)
        "flux",
        lambda: diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4 * CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
            guidance_embeds=True,
        ),
        lambda batch, generator: {
            "prompt_embeds": _text(batch, generator),
            "pooled_prompt_embeds": torch.randn(batch, 16, generator=generator),
            "guidance": torch.full((batch,), 3.5),
        },
        _flux_reference,
    ),
}


def tiny(family: str, **options):
    """A tiny transformer of the family (seeded) and an untouched copy of it."""
    torch.manual_seed(0)
    transformer = FAMILIES[family].make(**options).eval()
    return transformer, copy.deepcopy(transformer)


def adapted(family: str, **options):
    """A tiny adapter (copy-initialised emb_2) and the unmodified transformer it started from."""
    transformer, original = tiny(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_adapter(family, transformer, **options), original


def inputs(family: str, batch: int = BATCH):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=generator)
    return x, FAMILIES[family].condition(batch, generator)


def perturb(module: torch.nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


TIMES = torch.tensor([0.9, 0.5, 0.25, 1.0])
FAMILY_NAMES = sorted(FAMILIES)


# -- the wrapped time embedding and the state dict ------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_state_dict_keeps_original_keys_and_adds_released_names(family):
    transformer, original = tiny(family)
    with pytest.warns(UserWarning, match="initialised as a copy"):
        adapter = adapter_for(transformer)
    name = ADAPTERS[family].embedding_name
    before, after = original.state_dict(), transformer.state_dict()
    added = sorted(set(after) - set(before))
    assert set(before) <= set(after)
    assert all(torch.equal(before[key], after[key]) for key in before)
    expected = sorted(f"{name}_2.{key[len(name) + 1:]}" for key in before if key.startswith(name + "."))
    assert added == expected == sorted(extra_state_dict(adapter))
    assert added[0].startswith({"z_image": "t_embedder_2.", "sana": "time_embed_2."}.get(family, "time_text_embed_2."))
    # emb_2 starts as a copy of emb; emb itself stays in place, wrapped by a forward hook.
    assert all(torch.equal(after[key], after[name + key[len(name) + 2:]]) for key in added)
    assert isinstance(adapter.time_embedding, TargetTimeEmbedding)
    assert adapter.time_embedding.first is getattr(transformer, name) is transformer.get_submodule(name)
    assert adapter.time_embedding.second is adapter.second_embedding
    assert family_of(transformer) == family and adapter.family == family


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_equals_unmodified_model_when_target_time_equals_time(family):
    adapter, original = adapted(family)
    x, condition = inputs(family)
    with torch.no_grad():
        expected = FAMILIES[family].reference(original, x, TIMES, condition)
        assert torch.equal(adapter(x, TIMES, TIMES, condition), expected)
        # A direct call of the adapted transformer (no times set) is the original model too.
        assert torch.equal(FAMILIES[family].reference(adapter.transformer, x, TIMES, condition), expected)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_single_time_embedding_is_the_reference_lora_call_at_t_minus_half_r(family):
    """The reference's LoRA method calls the unmodified model at ``t - r/2`` (its
    ``model(x_t, t=q - tt / 2)``), on the fake trajectory too; no emb_2 exists."""
    adapter, original = adapted(family, single_time_embedding=True)
    assert adapter.time_embedding is None and not any(key.endswith("_2") for key in adapter.state_dict())
    x, condition = inputs(family)
    times = torch.tensor([0.9, 0.5, -0.6, 1.0])
    targets = torch.tensor([0.2, 0.5, -0.6, 0.0])
    with torch.no_grad():
        output = adapter(x, times, targets, condition)
        expected = FAMILIES[family].reference(original, x, times - targets / 2, condition)
        # Z-Image's pipeline clock (1 - t) has no fake side: its reference covers t >= 0 only.
        rows = [0, 1, 3] if family == "z_image" else [0, 1, 2, 3]
        assert torch.allclose(output[rows], expected[rows], atol=1e-6)
        # Not the original model at r = t (the reference's approximation): t/2 is what it sees.
        assert not torch.allclose(adapter(x, TIMES, TIMES, condition), FAMILIES[family].reference(original, x, TIMES, condition))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bfloat16_model_is_unchanged_at_target_time_equal_to_time(family):
    adapter, original = adapted(family)
    adapter.to(torch.bfloat16), original.to(torch.bfloat16)
    x, condition = inputs(family)
    x = x.bfloat16()
    condition = {key: value.bfloat16() if value.is_floating_point() else value for key, value in condition.items()}
    with torch.no_grad():
        output = adapter(x, TIMES, TIMES, condition)
        assert output.dtype == torch.bfloat16
        assert torch.equal(output, FAMILIES[family].reference(original, x, TIMES, condition))
        assert torch.isfinite(adapter(x, -TIMES, -TIMES * 0.5, condition)).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_target_time_and_sign_of_time_reach_the_model(family):
    adapter, _ = adapted(family)
    x, condition = inputs(family)
    with torch.no_grad():
        real = adapter(x, TIMES, TIMES, condition)
        # (t = -1 is not used: it is -0 on Z-Image's clock, indistinguishable from +0.)
        fake = adapter(x[:3], -TIMES[:3], -TIMES[:3], {key: value[:3] for key, value in condition.items()})
        jump = adapter(x, TIMES, TIMES * 0.5, condition)
        fake_jump = adapter(x, -TIMES, -TIMES * 0.5, condition)
    assert not torch.allclose(fake, real[:3], atol=1e-5)
    assert not torch.allclose(jump, real, atol=1e-5)
    assert not torch.allclose(fake_jump, jump, atol=1e-5)
    assert torch.isfinite(fake_jump).all()


def test_reference_z_image_time_hides_the_sign_when_target_equals_time():
    adapter, _ = adapted("z_image", absolute_time=True)
    x, condition = inputs("z_image")
    with torch.no_grad():
        assert torch.equal(adapter(x, -TIMES, -TIMES, condition), adapter(x, TIMES, TIMES, condition))
        fake_jump = adapter(x, -TIMES, -TIMES * 0.5, condition)
        assert not torch.allclose(fake_jump, adapter(x, TIMES, TIMES * 0.5, condition))


EMBEDDING_ARGUMENTS = {  # what each forward passes its time embedding after the timestep
    "qwen_image": lambda: (torch.zeros(3, 7),),  # hidden_states, read for its dtype only
    "z_image": lambda: (),
    "sd3": lambda: (torch.randn(3, 16),),  # pooled projections
    "flux": lambda: (torch.full((3,), 3500.0), torch.randn(3, 16)),  # guidance x 1000, pooled
}
EMBEDDING_SCALE = {"qwen_image": 1.0, "sd3": 1000.0, "flux": 1000.0}  # Qwen-Image's embedding scales itself


SPEC_CASES = [(family, None) for family in FAMILY_NAMES if family not in ("z_image", "sana")] + [
    ("z_image", "data"), ("z_image", "reference"),  # where r = 0 lands on the reversed clock
]


@pytest.mark.parametrize("family, zero_time", SPEC_CASES)
def test_second_embedding_is_added_as_in_the_spec(family, zero_time):
    """``emb(t) + emb_2(r) * (t - r)`` with each family's own scaling (spec section 5)."""
    adapter, _ = adapted(family, **({"zero_time": zero_time} if zero_time else {}))
    perturb(adapter.second_embedding)
    wrapper = adapter.time_embedding
    first, second = wrapper.first, wrapper.second
    t, r = torch.tensor([0.8, -0.6, 0.3]), torch.tensor([0.2, -0.1, 0.0])
    extra = EMBEDDING_ARGUMENTS[family]()
    with torch.no_grad():
        if family == "z_image":  # reversed clock, 1000 (r' - t'), weight |t' - r'|
            zero_sign = 1.0 if zero_time == "data" else 0.0  # r = 0 -> r' = 1 (data end) or 0 (reference)
            sign = lambda s: torch.where(s == 0, zero_sign, torch.sign(s))  # noqa: E731
            clock_t, clock_r = sign(t) * (1 - t.abs()), sign(r) * (1 - r.abs())
            timestep = clock_t * 1000
            expected_second = second((clock_r - clock_t) * 1000) * (clock_t - clock_r).abs()[:, None]
        else:
            timestep = t * EMBEDDING_SCALE[family]
            expected_second = second(r * EMBEDDING_SCALE[family], *extra) * (t - r)[:, None]
        plain = first(timestep, *extra)  # no times set: emb alone
        with wrapper.target(t, r):
            combined = first(timestep, *extra)  # the transformer's call, through the hook
    assert torch.allclose(combined, plain + expected_second, atol=1e-4)  # sinusoids of ~1000 in float32
    assert wrapper.times is None


def test_time_conventions():
    t, r = torch.tensor([0.75, -0.5, 0.5]), torch.tensor([0.25, -0.25, 0.0])
    assert torch.equal(QWEN_IMAGE_TIME.model_time(t), t)
    assert torch.equal(QWEN_IMAGE_TIME.second_embedding_input(t, r).float(), r)
    assert torch.equal(FLUX_TIME.model_time(t), t)
    assert torch.equal(FLUX_TIME.second_embedding_input(t, r).float(), r * 1000)
    assert torch.equal(SD3_TIME.model_time(t), t * 1000)
    for convention in (QWEN_IMAGE_TIME, SD3_TIME, FLUX_TIME):
        assert torch.equal(convention.second_embedding_weight(t, r), t - r) and not convention.reversed
    assert torch.equal(Z_IMAGE_TIME.model_time(t), torch.tensor([0.25, -0.5, 0.5]))
    # r = 0 maps to 0 on the reversed clock (torch.sign(0) = 0), as in the reference code.
    assert torch.equal(Z_IMAGE_TIME.second_embedding_input(t, r).float(), torch.tensor([500.0, -250.0, -500.0]))
    assert torch.equal(Z_IMAGE_TIME.second_embedding_weight(t, r), torch.tensor([0.5, 0.25, 0.5]))
    assert torch.equal(TimeConvention(reversed=True, absolute_time=True).model_time(t), torch.tensor([0.25, 0.5, 0.5]))
    # With zero_time="data", r = 0 maps to the data end r' = 1 instead: emb_2 gets 1000 (t - r), weight t.
    data = TimeConvention(reversed=True, zero_time="data")
    assert torch.equal(data.model_clock(torch.tensor([0.0, -0.0, 0.25, -0.25])), torch.tensor([1.0, 1.0, 0.75, -0.75]))
    assert torch.equal(data.second_embedding_input(t, r).float(), torch.tensor([500.0, -250.0, 500.0]))
    assert torch.equal(data.second_embedding_weight(t, r), torch.tensor([0.5, 0.25, 0.5]))
    with pytest.raises(ValueError, match="zero_time must be one of"):
        TimeConvention(reversed=True, zero_time="noise")
    with pytest.raises(ValueError, match="reversed clock"):
        TimeConvention(zero_time="data")  # a forward clock has no reversed zero to place


def test_qwen_zero_cond_t_rows_get_no_second_term():
    transformer, original = tiny("qwen_image", zero_cond_t=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = adapter_for(transformer)
    x, condition = inputs("qwen_image")
    with torch.no_grad():
        assert torch.equal(adapter(x, TIMES, TIMES, condition), _qwen_reference(original, x, TIMES, condition))
        assert torch.isfinite(adapter(x, TIMES, TIMES * 0.5, condition)).all()


# -- registry and input checks ---------------------------------------------------------------


def test_registry_and_errors():
    transformer, _ = tiny("sd3")
    with pytest.raises(ValueError, match="unknown adapter family"):
        build_adapter("pixart", transformer)
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        build_adapter("qwen_image", transformer)
    with pytest.raises(ValueError, match="no TwinFlow adapter"):
        adapter_for(torch.nn.Linear(2, 2))
    adapter, _ = adapted("sd3")
    with pytest.raises(ValueError, match="already has a TwinFlow adapter"):
        adapter_for(adapter.transformer)
    x, condition = inputs("sd3")
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        adapter(x, TIMES, TIMES, {"prompt_embeds": condition["prompt_embeds"]})
    with pytest.raises(ValueError, match="shape"):
        adapter(x, TIMES[:2], TIMES[:2], condition)
    with torch.no_grad():  # scalar times broadcast over the batch
        assert torch.equal(adapter(x, 0.5, 0.5, condition), adapter(x, torch.full((BATCH,), 0.5), 0.5, condition))


# -- extra weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_extra_weights_round_trip_under_released_names(family, tmp_path):
    adapter, original = adapted(family)
    perturb(adapter.second_embedding)
    path = save_extra_weights(adapter, tmp_path / "extra.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(extra_state_dict(adapter))
        assert handle.metadata()["twinflow_family"] == family
    x, condition = inputs(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded weights: no copy-initialisation notice
        restored = build_adapter(family, copy.deepcopy(original), extra_weights=path)
    with torch.no_grad():
        assert torch.equal(restored(x, TIMES, TIMES * 0.5, condition), adapter(x, TIMES, TIMES * 0.5, condition))


def test_extra_weights_found_in_a_sharded_diffusers_folder(tmp_path):
    adapter, _ = adapted("qwen_image")
    perturb(adapter.second_embedding)
    folder = tmp_path / "pipeline" / "transformer"
    adapter.transformer.save_pretrained(folder, max_shard_size="100KB")  # the released layout, sharded
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "QwenImageTransformer2DModel"
    found = find_extra_weights(tmp_path / "pipeline", "time_text_embed_2")
    assert sorted(found) == sorted(extra_state_dict(adapter))
    restored = load_adapter(tmp_path / "pipeline")
    x, condition = inputs("qwen_image")
    with torch.no_grad():
        assert torch.equal(restored(x, TIMES, TIMES * 0.5, condition), adapter(x, TIMES, TIMES * 0.5, condition))


def test_a_folder_of_pickled_weights_is_refused_unread(tmp_path, monkeypatch):
    """Issue 14, item 6: the training path reads transformers from safetensors only."""
    adapter, _ = adapted("sd3")
    folder = tmp_path / "transformer"
    adapter.transformer.save_pretrained(folder, safe_serialization=False)  # diffusion_pytorch_model.bin
    assert not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickled weight file was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=r"no \.safetensors weights \(only \['diffusion_pytorch_model\.bin'\]\)"):
        load_adapter(folder)
    monkeypatch.undo()
    adapter.transformer.save_pretrained(folder)  # the same weights as safetensors beside the .bin: those are read
    restored = load_adapter(folder)
    x, condition = inputs("sd3")
    with torch.no_grad():
        assert torch.equal(restored(x, TIMES, TIMES * 0.5, condition), adapter(x, TIMES, TIMES * 0.5, condition))


def test_a_lora_file_without_lora_weights_is_named(tmp_path):
    """Issue 14, item 3: other weights under the LoRA file's name are an error, not the base model."""
    from twinflow.adapters import load_lora_export
    from twinflow.adapters.exported import LORA_WEIGHTS_FILE

    export = tmp_path / "lora"
    export.mkdir()
    save_file({"transformer.proj_out.weight": torch.zeros(2, 2)}, str(export / LORA_WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"pytorch_lora_weights\.safetensors holds no LoRA weights .*found transformer\.proj_out\.weight"):
        load_lora_export(tmp_path / "no_base_needed", export)


def test_wrong_extra_weights_are_named(tmp_path):
    adapter, _ = adapted("qwen_image")
    weights = extra_state_dict(adapter)
    renamed = dict(weights)
    key = sorted(renamed)[0]
    renamed[key.replace("linear_1", "linear_9")] = renamed.pop(key)
    with pytest.raises(ValueError, match="missing .*linear_1.*unexpected .*linear_9"):
        load_extra_weights(adapter, renamed)
    with pytest.raises(ValueError, match=r"unexpected stray\.weight"):
        load_extra_weights(adapter, {**weights, "stray.weight": torch.zeros(1)})
    load_extra_weights(adapter, {**adapter.transformer.state_dict(), **weights})  # a full state dict is fine
    z_image, _ = adapted("z_image")
    path = save_extra_weights(z_image, tmp_path / "z_image.safetensors")
    with pytest.raises(ValueError, match=r"missing time_text_embed_2\..*unexpected t_embedder_2\."):
        load_extra_weights(adapter, path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.bin"))
    with pytest.raises(ValueError, match="safetensors"):
        load_extra_weights(adapter, tmp_path / "model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        save_extra_weights(adapter, tmp_path / "extra.pt")


# -- the adapter as a TwinFlow backbone ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_objective_step_and_sampler_run_on_the_adapter(family):
    adapter, _ = adapted(family)
    adapter.train()
    x, condition = inputs(family)
    null_condition = {**condition, "prompt_embeds": torch.zeros_like(condition["prompt_embeds"])}
    objective = TwinFlowObjective(objective_config("twinflow"))
    result = objective(adapter, x, condition, null_condition, generator=torch.Generator().manual_seed(3))
    result.loss.backward()
    assert torch.isfinite(result.loss)
    # (Qwen-Image's last block computes text outputs that nothing reads: those get no gradient.)
    gradients = [p.grad for p in adapter.parameters() if p.grad is not None]
    assert len(gradients) > 0.9 * len(list(adapter.parameters()))
    assert all(torch.isfinite(g).all() for g in gradients)
    for embedding in (adapter.time_embedding.first, adapter.second_embedding):
        assert all(p.grad is not None for p in embedding.parameters())
        assert any(p.grad.abs().sum() > 0 for p in embedding.parameters())

    adapter.eval()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    generated = sample(adapter, noise, condition, sampler_config("2nfe"), generator=torch.Generator().manual_seed(5))
    assert generated.sample.shape == x.shape and torch.isfinite(generated.sample).all()
    assert generated.network_calls == 2


def test_ema_copy_of_an_adapter_uses_its_own_embeddings():
    adapter, _ = adapted("z_image")
    teacher = EMATeacher(adapter, decay=0.5)
    copied = teacher.network.time_embedding
    assert copied is not adapter.time_embedding
    assert copied.first is teacher.network.transformer.t_embedder
    assert copied.second is teacher.network.second_embedding
    assert list(copied.first._forward_hooks.values()) == [copied]
    x, condition = inputs("z_image")
    with torch.no_grad():
        before = teacher(x, TIMES, TIMES * 0.5, condition)
        perturb(adapter.second_embedding)
        assert torch.equal(teacher(x, TIMES, TIMES * 0.5, condition), before)
        assert not torch.allclose(adapter(x, TIMES, TIMES * 0.5, condition), before)
