"""Text-to-image TwinFlow training through the one training loop, on a tiny random Z-Image
transformer and a tiny latent cache (configs/tiny_text_to_image.yaml): full-parameter training,
exact resume, export to a diffusers folder, and the null condition of the cache."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

diffusers = pytest.importorskip("diffusers")

from tiny_text_to_image import (  # noqa: E402
    CHANNELS,
    LORA,
    SIZE,
    TINY,
    TOKENS,
    WIDTH,
    encode_prompts,
    identity,
    save_tiny_transformer,
    write_tiny_cache,
)

from twinflow.adapters import extra_state_dict, load_adapter  # noqa: E402
from twinflow.data import CachedLatents, cache_dataset  # noqa: E402
from twinflow.train.checkpoint import checkpoint_folder, list_checkpoints  # noqa: E402
from twinflow.train.config import ConfigError, load_config  # noqa: E402
from twinflow.train.data import CachedLatentData  # noqa: E402
from twinflow.train.export import export_diffusers  # noqa: E402
from twinflow.train.loop import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.fixture(scope="module")
def transformer_folder(tmp_path_factory) -> Path:
    return save_tiny_transformer(tmp_path_factory.mktemp("z_image") / "transformer")


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory) -> Path:
    return write_tiny_cache(tmp_path_factory.mktemp("cache") / "latents")


@pytest.fixture(scope="module")
def config(transformer_folder, latent_cache) -> dict:
    return load_config(TINY, [f"model.path={transformer_folder}", f"data.root={latent_cache}"])


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run_a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 copy-initialised from a plain pretrained folder
        result = train(config, run)
    assert result.steps == 4 and result.grids == {}
    assert result.final_checkpoint == checkpoint_folder(run, 4)
    return run


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_null_condition_is_the_cached_empty_prompt(latent_cache):
    cache = CachedLatents(latent_cache)
    assert set(cache.null_condition) == {"prompt_embeds", "prompt_embeds_mask"}
    expected = encode_prompts([""])
    assert all(torch.equal(cache.null_condition[key], expected[key]) for key in expected)
    latents, condition, null = CachedLatentData(cache).batch(torch.tensor([0, 3, 6]), torch.device("cpu"))
    assert latents.shape == (3, CHANNELS, SIZE, SIZE) and latents.dtype == torch.float32
    assert torch.equal(null["prompt_embeds"], expected["prompt_embeds"].expand(3, -1, -1))
    assert condition["prompt_embeds"].shape == null["prompt_embeds"].shape


def test_zero_fallback_without_a_cached_null_condition(latent_cache, tmp_path):
    copy = tmp_path / "no_null"
    shutil.copytree(latent_cache, copy)
    (copy / "null_condition.safetensors").unlink()
    _, condition, null = CachedLatentData(CachedLatents(copy)).batch(torch.tensor([1, 2]), torch.device("cpu"))
    assert torch.equal(null["prompt_embeds"], torch.zeros_like(condition["prompt_embeds"]))
    assert torch.equal(null["prompt_embeds_mask"], condition["prompt_embeds_mask"])  # masks kept: no empty caption


def test_trains_the_transformer_and_its_second_embedding(uninterrupted, transformer_folder):
    final = _tensors(checkpoint_folder(uninterrupted, 4) / "model.safetensors")
    start = _tensors(next(transformer_folder.glob("*.safetensors")))
    assert any(key.startswith("transformer.t_embedder_2.") for key in final)
    assert all(torch.isfinite(value).all() for value in final.values())
    changed = [key for key, value in start.items() if not torch.equal(final[f"transformer.{key}"], value)]
    assert len(changed) > len(start) // 2
    ema = _tensors(checkpoint_folder(uninterrupted, 4) / "ema.safetensors")
    assert set(ema) == set(final) and any(not torch.equal(ema[key], final[key]) for key in final)


def _stopped_and_resumed(config: dict, run: Path) -> Path:
    """Train 4 steps, lose the step-4 checkpoint, resume from step 2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config, run)
        shutil.rmtree(checkpoint_folder(run, 4))
        assert list_checkpoints(run)[-1] == checkpoint_folder(run, 2)
        train(config, run, resume=True)
    return run


def test_resume_equals_uninterrupted(config, uninterrupted, tmp_path):
    run = _stopped_and_resumed(config, tmp_path / "run_b")
    for name in ("model.safetensors", "ema.safetensors"):
        resumed = _tensors(checkpoint_folder(run, 4) / name)
        expected = _tensors(checkpoint_folder(uninterrupted, 4) / name)
        assert all(torch.equal(resumed[key], expected[key]) for key in expected), name


@pytest.mark.parametrize("use_ema", [False, True])
def test_export_loads_back_with_the_trained_weights(uninterrupted, tmp_path, use_ema):
    out = export_diffusers(uninterrupted, tmp_path / "export", use_ema=use_ema)
    assert (out / "config.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # trained emb_2 found: no copy-initialisation notice
        adapter = load_adapter(out)
    trained = _tensors(checkpoint_folder(uninterrupted, 4) / ("ema.safetensors" if use_ema else "model.safetensors"))
    loaded = adapter.state_dict()
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[key], trained[key]) for key in trained)
    assert all(key.startswith("t_embedder_2.") for key in extra_state_dict(adapter))


def test_config_errors(transformer_folder, latent_cache):
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(TINY, [f"model.path={transformer_folder}", "data.root=null"])
    with pytest.raises(ConfigError, match=r"data\.limit"):
        load_config(TINY, [f"model.path={transformer_folder}", f"data.root={latent_cache}", "data.limit=2"])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(TINY, [f"data.root={latent_cache}", "training.gradient_checkpointing=1"])


# -- LoRA through PEFT, the EMA teacher as a second adapter ----------------------------------


@pytest.fixture(scope="module")
def lora_config(transformer_folder, latent_cache) -> dict:
    pytest.importorskip("peft")
    return load_config(TINY, [f"model.path={transformer_folder}", f"data.root={latent_cache}", LORA])


@pytest.fixture(scope="module")
def lora_run(lora_config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lora_a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(lora_config, run)
    return run


def test_lora_checkpoint_holds_only_the_adapters(lora_run):
    weights = _tensors(checkpoint_folder(lora_run, 4) / "model.safetensors")
    assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights)
    default = {key: value for key, value in weights.items() if ".default." in key}
    ema = {key.replace(".default.", ".ema."): value for key, value in default.items()}
    assert set(ema) | set(default) == set(weights)
    assert any(value.abs().sum() > 0 for key, value in default.items() if ".lora_B." in key)  # B started at 0
    assert any(not torch.equal(weights[key], value) for key, value in ema.items())  # the EMA lags
    assert not (checkpoint_folder(lora_run, 4) / "ema.safetensors").exists()


def test_lora_trains_only_the_adapter_and_the_teacher_is_the_ema_adapter(lora_config, latent_cache):
    from twinflow.objective import TwinFlowObjective, objective_config
    from twinflow.train.lora import AdapterEMATeacher, teacher_for
    from twinflow.train.backbone import build_backbone
    from twinflow.train.loop import objective_loss

    data = CachedLatentData(CachedLatents(latent_cache))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, architecture = build_backbone(lora_config, data)
    assert model.transformer.gradient_checkpointing  # training.gradient_checkpointing: true
    teacher = teacher_for(model, 0.9)
    assert isinstance(teacher, AdapterEMATeacher) and architecture["ema_adapter"]
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert names and all(".lora_A.default." in name or ".lora_B.default." in name for name in names)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    objective = TwinFlowObjective(objective_config("twinflow"))
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        images, condition, null = data.batch(torch.arange(4) + step, torch.device("cpu"))
        result = objective_loss(objective, model, teacher.network, images, condition, null, generator)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        teacher.update(model)
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(".lora_" in key for key in changed)  # base weights bitwise unchanged
    assert any(".ema." in key for key in changed) and any(".default." in key for key in changed)
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == names
    x, condition, _ = data.batch(torch.arange(2), torch.device("cpu"))
    with torch.no_grad():
        student, ema = model(x, 0.7, 0.2, condition), teacher.network(x, 0.7, 0.2, condition)
    assert not torch.equal(student, ema)


def test_lora_resume_equals_uninterrupted(lora_config, lora_run, tmp_path):
    run = _stopped_and_resumed(lora_config, tmp_path / "lora_b")
    resumed = _tensors(checkpoint_folder(run, 4) / "model.safetensors")
    expected = _tensors(checkpoint_folder(lora_run, 4) / "model.safetensors")
    assert set(resumed) == set(expected) and all(torch.equal(resumed[key], expected[key]) for key in expected)


@pytest.mark.parametrize("use_ema", [False, True])
def test_lora_export_loads_back(lora_run, transformer_folder, tmp_path, use_ema):
    from twinflow.train.export import EXTRA_WEIGHTS_FILE, LORA_WEIGHTS_FILE, load_lora_export

    out = export_diffusers(lora_run, tmp_path / "lora_export", use_ema=use_ema)
    assert (out / LORA_WEIGHTS_FILE).is_file() and (out / EXTRA_WEIGHTS_FILE).is_file()
    adapter = load_lora_export(transformer_folder, out)
    trained = _tensors(checkpoint_folder(lora_run, 4) / "model.safetensors")
    source = ".ema." if use_ema else ".default."
    loaded = adapter.state_dict()
    expected = {key.replace(source, ".default."): value for key, value in trained.items() if source in key}
    assert expected and all(torch.equal(loaded[key], value) for key, value in expected.items())
    base = _tensors(next(transformer_folder.glob("*.safetensors")))
    for key, value in base.items():  # PEFT moves wrapped weights to <layer>.base_layer.*
        name = f"transformer.{key}"
        if name not in loaded:
            name = name.rsplit(".", 1)[0] + ".base_layer." + name.rsplit(".", 1)[1]
        assert torch.equal(loaded[name], value), key


def test_lora_with_a_trained_second_embedding(transformer_folder, latent_cache, tmp_path):
    pytest.importorskip("peft")
    from twinflow.train.export import load_lora_export

    lora = LORA.replace("}", ", train_second_embedding: true}")
    config = load_config(TINY, [f"model.path={transformer_folder}", f"data.root={latent_cache}", lora, "phases.0.steps=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config, tmp_path / "run")
    weights = _tensors(checkpoint_folder(tmp_path / "run", 2) / "model.safetensors")
    second = {key: value for key, value in weights.items() if key.startswith("transformer.t_embedder_2.")}
    first = _tensors(next(transformer_folder.glob("*.safetensors")))
    assert second and set(weights) - set(second) and all(".lora_" in key for key in set(weights) - set(second))
    copied_from = {key: first[key[len("transformer."):].replace("t_embedder_2.", "t_embedder.")] for key in second}
    assert any(not torch.equal(value, copied_from[key]) for key, value in second.items())  # emb_2 trained
    adapter = load_lora_export(transformer_folder, export_diffusers(tmp_path / "run", tmp_path / "export"))
    loaded = adapter.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in second.items())


# -- the single-embedding variant (spec section 4: the one embedding receives t - r/2) --------


def test_single_time_embedding_feeds_t_minus_half_r(transformer_folder):
    adapter = load_adapter(transformer_folder, single_time_embedding=True)
    plain = diffusers.ZImageTransformer2DModel.from_pretrained(transformer_folder)
    assert not any("t_embedder_2" in key for key in adapter.state_dict()) and extra_state_dict(adapter) == {}
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, CHANNELS, SIZE, SIZE, generator=generator)
    embeds = torch.randn(2, TOKENS, WIDTH, generator=generator)
    time, target = torch.tensor([0.9, 0.6]), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        output = adapter(x, time, target, {"prompt_embeds": embeds})
        # ZImagePipeline's call: reversed clock t' = 1 - s, velocity = -output.
        reference = plain(list(x.unsqueeze(2).unbind(0)), 1 - (time - target / 2), list(embeds.unbind(0)), return_dict=False)[0]
    assert torch.allclose(output, -torch.stack(reference).squeeze(2), atol=1e-6)


def test_lora_on_a_single_time_embedding(transformer_folder, latent_cache, tmp_path):
    pytest.importorskip("peft")
    from twinflow.train.export import EXTRA_WEIGHTS_FILE, load_lora_export

    overrides = [f"model.path={transformer_folder}", f"data.root={latent_cache}", LORA, "phases.0.steps=2",
                 "model.single_time_embedding=true"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(load_config(TINY, overrides), tmp_path / "run")
    out = export_diffusers(tmp_path / "run", tmp_path / "export")
    assert not (out / EXTRA_WEIGHTS_FILE).exists()
    adapter = load_lora_export(transformer_folder, out)
    assert adapter.single_time_embedding
    trained = _tensors(checkpoint_folder(tmp_path / "run", 2) / "model.safetensors")
    loaded = adapter.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in trained.items() if ".default." in key)
    with pytest.raises(ConfigError, match="train_second_embedding"):
        load_config(TINY, overrides[:-2] + [LORA.replace("}", ", train_second_embedding: true}"), "model.single_time_embedding=true"])


@pytest.mark.parametrize(
    "overrides",
    [["precision=bf16"], ["precision=bf16", LORA], ["phases.0.objective={preset: twinflow, image_free: true}"]],
    ids=["bf16", "bf16_lora", "image_free"],
)
def test_bf16_autocast_and_image_free_mode_run(transformer_folder, latent_cache, tmp_path, overrides):
    if any("lora" in override for override in overrides):
        pytest.importorskip("peft")
    config = load_config(TINY, [f"model.path={transformer_folder}", f"data.root={latent_cache}", "phases.0.steps=2", *overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, tmp_path / "run")
    weights = _tensors(result.final_checkpoint / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())


# -- aspect-ratio buckets: a cache of several latent shapes --------------------------------------


class TwoShapeLatents:
    """Sixteen latents of two shapes (8x8 and 8x12), bucket ids alternating."""

    description = "random latents of two shapes"

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.bucket_ids = torch.arange(16) % 2
        self.images = [torch.rand(CHANNELS, SIZE, SIZE + 4 * int(bucket), generator=generator) * 2 - 1 for bucket in self.bucket_ids]
        self.captions = [f"caption {index}" for index in range(16)]

    def __len__(self) -> int:
        return 16

    def __getitem__(self, indices: torch.Tensor):
        return torch.stack([self.images[int(index)] for index in indices]), [self.captions[int(index)] for index in indices]


def test_a_bucketed_cache_trains_one_shape_per_batch(transformer_folder, tmp_path):
    cache_folder = tmp_path / "bucketed"
    cache_dataset(TwoShapeLatents(), identity, encode_prompts, cache_folder, shard_size=8, batch_size=4, progress=False, null_prompt="")
    data = CachedLatentData(CachedLatents(cache_folder))
    assert data.latent_shapes == [(CHANNELS, SIZE, SIZE), (CHANNELS, SIZE, SIZE + 4)]
    order = data.batch_order(4, seed=0)
    shapes = [data.batch(order.next_indices(), torch.device("cpu"))[0].shape for _ in range(order.batches_per_epoch)]
    assert {shape[-1] for shape in shapes} == {SIZE, SIZE + 4} and all(shape[0] == 4 for shape in shapes)

    config = load_config(TINY, [f"model.path={transformer_folder}", f"data.root={cache_folder}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, tmp_path / "run")
        shutil.rmtree(checkpoint_folder(tmp_path / "run", 4))
        train(config, tmp_path / "run", resume=True)  # the bucket order resumes too
    weights = _tensors(result.final_checkpoint / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())
    uninterrupted = tmp_path / "uninterrupted"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config, uninterrupted)
    expected = _tensors(checkpoint_folder(uninterrupted, 4) / "model.safetensors")
    resumed = _tensors(checkpoint_folder(tmp_path / "run", 4) / "model.safetensors")
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)


# -- a bfloat16 frozen base under LoRA (model.dtype: bf16) ---------------------------------------


def test_lora_on_a_bfloat16_base_keeps_trained_weights_in_float32(transformer_folder, latent_cache, tmp_path):
    pytest.importorskip("peft")
    from twinflow.train.backbone import build_backbone

    lora = LORA.replace("}", ", train_second_embedding: true}")
    overrides = [f"model.path={transformer_folder}", f"data.root={latent_cache}", lora, "model.dtype=bf16",
                 "precision=bf16", "phases.0.steps=2"]
    config = load_config(TINY, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = build_backbone(config, CachedLatentData(CachedLatents(latent_cache)))
        result = train(config, tmp_path / "run")
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained and all(dtypes[name] == torch.float32 for name in trained)
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if ".lora_" in name)  # the EMA adapter too
    frozen = [dtype for name, dtype in dtypes.items() if ".lora_" not in name and name not in trained]
    assert frozen and all(dtype == torch.bfloat16 for dtype in frozen)
    weights = _tensors(result.final_checkpoint / "model.safetensors")
    second = [value for key, value in weights.items() if "t_embedder_2" in key]
    assert second and all(value.dtype == torch.float32 and torch.isfinite(value).all() for value in weights.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["model.dtype=bf16", "precision=bf16"], "for a frozen base under"),
     (["model.dtype=bf16", LORA], "needs precision: bf16"),
     (["model.dtype=fp16"], "model.dtype must be")],
    ids=["full_parameter", "fp32_compute", "unknown"],
)
def test_bfloat16_base_config_errors(transformer_folder, latent_cache, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [f"model.path={transformer_folder}", f"data.root={latent_cache}", *overrides])
