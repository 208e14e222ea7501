"""Tests for twinflow.data.cache_writer and cache_reader: the offline latent / embedding cache and its reader."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from twinflow.data import (
    BucketBatches,
    CachedLatents,
    CaptionedDataConfig,
    ShuffledBatches,
    cache_dataset,
    load_captioned,
    prompt_encoder,
    vae_encoder,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS = 6  # length of the fake prompt embeddings
WIDTH = 5  # their feature size


class FakePromptEncoder:
    """A deterministic stand-in for a text encoder: embeddings from the caption's characters.

    ``variable=True`` pads to the longest caption of the batch, as Qwen-Image's encoder does.
    """

    description = "fake prompt encoder"

    def __init__(self, variable: bool = False) -> None:
        self.variable = variable
        self.calls = 0

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls += 1
        length = max(len(caption) for caption in captions) if self.variable else TOKENS
        embeds = torch.zeros(len(captions), length, WIDTH)
        mask = torch.zeros(len(captions), length, dtype=torch.int64)
        for row, caption in enumerate(captions):
            codes = torch.tensor([float(ord(char)) for char in caption[:length]])
            embeds[row, : len(codes)] = codes[:, None] * torch.arange(1, WIDTH + 1)
            mask[row, : len(codes)] = 1
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "pooled": embeds.mean(dim=1)}


class FailingAfter:
    """Wraps an encoder and raises on call number ``calls + 1`` (an interrupted cache pass)."""

    def __init__(self, encode, calls: int) -> None:
        self.encode = encode
        self.calls = calls
        self.description = encode.description

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.calls == 0:
            raise RuntimeError("interrupted")
        self.calls -= 1
        return self.encode(images)


class Counting:
    def __init__(self, encode) -> None:
        self.encode = encode
        self.calls = 0
        self.description = encode.description

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.encode(images)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
        shift_factor=0.1,
    ).eval()


def _write_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index, (width, height) in enumerate(sizes):
        pixels = np.random.default_rng(index).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index:02d}.png")
        (root / f"{index:02d}.txt").write_text(f"picture number {index}" + "!" * (index % 3))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    root = _write_folder(tmp_path_factory.mktemp("images") / "data", [(16, 16)] * 8)
    return load_captioned(CaptionedDataConfig(root=str(root), image_size=16))


@pytest.fixture(scope="module")
def reference(dataset, vae, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted cache: 8 items, shards of 3, encoder batches of 2."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    cache_dataset(dataset, vae_encoder(vae), FakePromptEncoder(), out, shard_size=3, batch_size=2, progress=False)
    return out


def _expected_batches(dataset, encode_images, encode_prompts, batches: list[list[int]]):
    """What the encoders give for the batches the cache pass uses, row by row."""
    latents, conditions = [], []
    for batch in batches:
        images, captions = dataset[torch.tensor(batch)]
        latents.append(encode_images(images))
        conditions.append(encode_prompts(captions))
    return torch.cat(latents), {key: torch.cat([c[key] for c in conditions]) for key in conditions[0]}


def test_cache_reads_back_exactly_the_encoder_outputs(dataset, vae, reference: Path) -> None:
    cache = CachedLatents(reference)
    assert len(cache) == 8 and cache.latent_shape == (4, 8, 8)
    assert cache.condition_keys == ("pooled", "prompt_embeds", "prompt_embeds_mask")
    assert cache.captions == dataset.captions
    assert cache.source_indices.tolist() == list(range(8))
    # Shards [0, 3), [3, 6), [6, 8); batches of two within each shard.
    latents, condition = _expected_batches(
        dataset, vae_encoder(vae), FakePromptEncoder(), [[0, 1], [2], [3, 4], [5], [6, 7]]
    )
    with torch.no_grad():
        raw = vae.encode(dataset[torch.arange(2)][0]).latent_dist.mode()
    torch.testing.assert_close(latents[:2], (raw - 0.1) * 0.5)  # AutoencoderKL's shift and scale

    order = ShuffledBatches(len(cache), batch_size=4, seed=1)
    for _ in range(3):
        indices = order.next_indices()
        got_latents, got_condition = cache[indices]
        assert torch.equal(got_latents, latents[indices])
        assert got_condition.keys() == condition.keys()
        for key, value in condition.items():
            assert torch.equal(got_condition[key], value[indices]) and got_condition[key].dtype == value.dtype
    single, single_condition = cache[5]
    assert torch.equal(single, latents[5]) and torch.equal(single_condition["pooled"], condition["pooled"][5])
    assert torch.equal(cache[[2, 3, 4, 7]][0], latents[[2, 3, 4, 7]])  # a run across a shard boundary
    assert torch.equal(pickle.loads(pickle.dumps(cache))[[1, 6]][0], latents[[1, 6]])
    with pytest.raises(IndexError):
        cache[8]


def test_index_json_contents(dataset, reference: Path) -> None:
    assert sorted(path.name for path in reference.iterdir()) == [
        "index.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"
    ]
    assert not reference.with_name("cache.partial").exists()
    index = json.loads((reference / "index.json").read_text())
    assert index["format"] == "twinflow-latent-cache" and index["version"] == 1
    assert (index["num_items"], index["num_shards"], index["shard_size"], index["batch_size"]) == (8, 3, 3, 2)
    assert [shard["num_items"] for shard in index["shards"]] == [3, 3, 2]
    assert index["shards"][2]["shapes"] == {
        "latents": [2, 4, 8, 8], "pooled": [2, WIDTH], "prompt_embeds": [2, TOKENS, WIDTH], "prompt_embeds_mask": [2, TOKENS]
    }
    assert index["tensors"] == {
        "latents": {"dtype": "float32", "shapes": [[4, 8, 8]]},
        "pooled": {"dtype": "float32", "shapes": [[WIDTH]]},
        "prompt_embeds": {"dtype": "float32", "shapes": [[TOKENS, WIDTH]]},
        "prompt_embeds_mask": {"dtype": "int64", "shapes": [[TOKENS]]},
    }
    assert index["source"] == dataset.description
    assert index["encoder"]["prompts"] == "fake prompt encoder"
    assert index["encoder"]["images"]["vae"] == "AutoencoderKL"
    assert index["encoder"]["images"]["latent"] == "posterior mean"
    assert (index["encoder"]["images"]["scaling_factor"], index["encoder"]["images"]["shift_factor"]) == (0.5, 0.1)
    assert index["captions"] == dataset.captions
    assert index["source_indices"] == list(range(8))
    assert index["dataset_report"] == {"total": 0, "counts": {}, "examples": []}


def test_interrupted_cache_resumes_and_matches(dataset, vae, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="interrupted"):  # fails in shard 1, after shard 0's two batches
        cache_dataset(dataset, FailingAfter(vae_encoder(vae), 2), FakePromptEncoder(), out, 3, 2, progress=False)
    partial = tmp_path / "cache.partial"
    assert not out.exists()
    assert sorted(path.name for path in partial.iterdir()) == ["plan.json", "shard_00000.safetensors"]

    encode = Counting(vae_encoder(vae))
    cache = cache_dataset(dataset, encode, FakePromptEncoder(), out, 3, 2, progress=False)
    assert encode.calls == 3  # only shards 1 and 2 were encoded: [3, 4], [5], [6, 7]
    assert not partial.exists() and len(cache) == 8
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in reference.iterdir())
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_finished_cache_is_reused_or_refused(dataset, vae, reference: Path) -> None:
    never = FailingAfter(vae_encoder(vae), 0)
    cache = cache_dataset(dataset, never, FakePromptEncoder(), reference, 3, 2, progress=False)
    assert len(cache) == 8  # same plan: returned without encoding
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        cache_dataset(dataset, never, FakePromptEncoder(), reference, 4, 2, progress=False)


def test_partial_of_another_plan_is_refused_then_overwritten(dataset, vae, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        cache_dataset(dataset, FailingAfter(vae_encoder(vae), 1), FakePromptEncoder(), out, 2, 2, progress=False)
    with pytest.raises(ValueError, match="plan differs.*pass --overwrite"):
        cache_dataset(dataset, vae_encoder(vae), FakePromptEncoder(), out, 4, 4, progress=False)
    cache = cache_dataset(dataset, vae_encoder(vae), FakePromptEncoder(), out, 4, 4, progress=False, overwrite=True)
    assert [shard["num_items"] for shard in cache.index["shards"]] == [4, 4]
    cache = cache_dataset(dataset, vae_encoder(vae), None, out, 8, 8, progress=False, overwrite=True)
    assert cache.condition_keys == () and cache[[0, 1]][1] == {}


def test_bucketed_cache_keeps_shapes_apart_and_pads_prompts(vae, tmp_path: Path) -> None:
    sizes = [(32, 16), (16, 16), (32, 16), (16, 32), (16, 16), (32, 16), (16, 16)]
    root = _write_folder(tmp_path / "data", sizes)
    config = CaptionedDataConfig(root=str(root), image_size=16, buckets=True, bucket_ratios=(0.5, 1.0, 2.0), bucket_multiple=8)
    dataset = load_captioned(config)
    prompts = FakePromptEncoder(variable=True)
    cache = cache_dataset(dataset, vae_encoder(vae), prompts, tmp_path / "cache", 2, 2, progress=False)

    assert len(dataset.buckets) == 3
    assert sorted(cache.buckets) == sorted((4, height // 2, width // 2) for height, width in dataset.buckets)
    first = 0
    for shard in cache.index["shards"]:  # a new shard at every bucket change
        assert len(set(cache.bucket_ids[first : first + shard["num_items"]].tolist())) == 1
        first += shard["num_items"]
    assert sorted(cache.source_indices.tolist()) == list(range(7))
    for position, source in enumerate(cache.source_indices.tolist()):
        assert cache.captions[position] == dataset.captions[source]
        assert cache[position][0].shape[1:] == tuple(s // 2 for s in dataset.image_size(source))

    batches = BucketBatches(cache.bucket_ids, batch_size=2, seed=0)
    for _ in range(4):
        latents, condition = cache[batches.next_indices()]
        assert latents.shape[0] == 2
    with pytest.raises(ValueError, match="BucketBatches"):
        cache[torch.arange(len(cache))]

    # Prompt lengths differ between batches: padded with zeros, the prefix is the encoder's output.
    embeds = cache.index["tensors"]["prompt_embeds"]["shapes"]
    assert len(embeds) > 1
    same_bucket = torch.nonzero(cache.bucket_ids == cache.bucket_ids[0]).flatten()
    _, condition = cache[same_bucket]
    for row, position in enumerate(same_bucket.tolist()):
        alone = prompts([cache.captions[position]])
        length = alone["prompt_embeds"].shape[1]
        assert torch.equal(condition["prompt_embeds"][row, :length], alone["prompt_embeds"][0])
        assert (condition["prompt_embeds"][row, length:] == 0).all()
        assert int(condition["prompt_embeds_mask"][row].sum()) == length


def test_vae_encoder_latents_mean_and_std_of_a_video_vae() -> None:
    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 2.0, 0.5, 1.0]
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=mean, latents_std=std,
    ).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    encode = vae_encoder(vae)
    latents = encode(images)
    with torch.no_grad():
        raw = vae.encode(images.unsqueeze(2)).latent_dist.mode().squeeze(2)
    expected = (raw - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents, expected)
    torch.testing.assert_close(encode.denormalize(latents), raw)
    assert encode.description["normalisation"].startswith("(z - latents_mean)")


def test_vae_encoder_samples_with_an_explicit_generator(vae) -> None:
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    first = vae_encoder(vae, generator=torch.Generator().manual_seed(3))(images)
    second = vae_encoder(vae, generator=torch.Generator().manual_seed(3))(images)
    mean = vae_encoder(vae)(images)
    assert torch.equal(first, second) and not torch.equal(first, mean)
    half = vae_encoder(vae, dtype=torch.bfloat16)
    assert half(images).dtype == torch.bfloat16 and half.description["latent"] == "posterior mean"
    torch.testing.assert_close(vae_encoder(vae).denormalize(mean), vae.encode(images).latent_dist.mode())


def _fake_pipeline(class_name: str, result):
    """An object whose class has a diffusers pipeline's name and an ``encode_prompt`` returning ``result``."""

    def encode_prompt(self, **options):
        self.options = options
        return result(options["prompt"])

    return type(class_name, (), {"encode_prompt": encode_prompt, "device": torch.device("cpu")})()


def test_prompt_encoder_maps_each_pipeline_to_its_adapter_condition() -> None:
    embeds = lambda prompts, length=3: torch.ones(len(prompts), length, 4)  # noqa: E731

    qwen = _fake_pipeline("QwenImagePipeline", lambda prompts: (embeds(prompts), None))  # mask dropped: all real
    condition = prompt_encoder(qwen, max_sequence_length=7)(["a", "b"])
    assert set(condition) == {"prompt_embeds", "prompt_embeds_mask"}
    assert torch.equal(condition["prompt_embeds_mask"], torch.ones(2, 3, dtype=torch.int64))
    assert qwen.options["max_sequence_length"] == 7 and qwen.options["prompt"] == ["a", "b"]

    z_image = _fake_pipeline("ZImagePipeline", lambda prompts: ([torch.ones(2, 4), torch.full((3, 4), 2.0)], []))
    condition = prompt_encoder(z_image)(["a", "b"])
    assert condition["prompt_embeds"].shape == (2, 3, 4)
    assert condition["prompt_embeds_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert (condition["prompt_embeds"][0, 2] == 0).all() and z_image.options["do_classifier_free_guidance"] is False

    pooled = lambda prompts: torch.zeros(len(prompts), 6)  # noqa: E731
    sd3 = _fake_pipeline("StableDiffusion3Pipeline", lambda prompts: (embeds(prompts), None, pooled(prompts), None))
    flux = _fake_pipeline("FluxPipeline", lambda prompts: (embeds(prompts), pooled(prompts), torch.zeros(3, 3)))
    for pipeline in (sd3, flux):
        encode = prompt_encoder(pipeline, dtype=torch.bfloat16)
        condition = encode(["a", "b"])
        assert set(condition) == {"prompt_embeds", "pooled_prompt_embeds"}
        assert condition["pooled_prompt_embeds"].shape == (2, 6) and condition["prompt_embeds"].dtype == torch.bfloat16
        assert encode.description["pipeline"] == type(pipeline).__name__
    assert sd3.options["do_classifier_free_guidance"] is False

    with pytest.raises(TypeError, match="knows the pipelines"):
        prompt_encoder(_fake_pipeline("StableDiffusionPipeline", lambda prompts: None))
