"""Text-to-image generation (twinflow.generation, ``twinflow generate | encode``) on tiny random folders.

The folders are what ``save_pretrained`` writes for real models of each family, at toy size and
built offline (twinflow.testing): tiny transformer, VAE, scheduler and, for Z-Image,
SD3 and Qwen-Image, tiny text encoders with a BPE tokenizer trained in code. Every tiny VAE
halves the image side and every transformer has patch size 2, so sizes are multiples of 4.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
from pathlib import Path
from PIL import Image

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from twinflow.cli import main  # noqa: E402
from twinflow.generation import (  # noqa: E402
    PromptEmbeddings,
    PromptEncoder,
    TextToImage,
    load_embeddings,
    read_image_metadata,
    save_embeddings,
    save_images,
)
from twinflow.families import FAMILIES  # noqa: E402
from twinflow.testing import build_tiny_folder  # noqa: E402
from twinflow.sampler import sample, sampler_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH, HEIGHT = 24, 16  # not square, so width and height cannot be swapped unnoticed
PROMPTS = ["a red fox in the snow", "an astronaut riding a horse", "fruit"]
COPY_WARNING = "initialised as a copy"
ENCODED_FAMILIES = ["z_image", "sd3", "qwen_image", "sana"]  # folders with text encoders
# Qwen-Image drops an all-ones text mask as its pipeline does, so a prompt alone and the same
# prompt padded in a batch take two attention paths: equal up to rounding (1 of 255).
BATCH_TOLERANCE = {"z_image": 0, "sd3": 0, "qwen_image": 1, "sana": 0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny folders: every family with trained-looking extra weights, plus plain variants."""
    root = tmp_path_factory.mktemp("models")
    built = {family: build_tiny_folder(root / family, family, extra_weights=True) for family in ENCODED_FAMILIES}
    built["flux"] = build_tiny_folder(root / "flux", "flux", text_encoder=False, extra_weights=True)
    built["z_image_plain"] = build_tiny_folder(root / "z_image_plain", "z_image", text_encoder=False)
    return built


@pytest.fixture(scope="module")
def pipes(folders):
    """One loaded TextToImage per family with a text encoder (loading is the slow part)."""
    return {family: TextToImage.from_pretrained(folders[family], device="cpu") for family in ENCODED_FAMILIES}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def largest_difference(first, second) -> int:
    return int(np.abs(pixels(first) - pixels(second)).max())


def generate(pipe, prompts=PROMPTS, **options):
    options = {"width": WIDTH, "height": HEIGHT, "progress": False, **options}
    return pipe.generate(prompts, **options)


# -- the command line ------------------------------------------------------------------------


def test_generate_command_writes_pngs_of_the_size_with_prompt_and_seed(folders, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a lighthouse at dusk\n\n", encoding="utf-8")
    out = tmp_path / "images"
    code = main([
        "generate", "--model", str(folders["z_image"]), "--prompt", PROMPTS[0], "--prompt-file", str(prompt_file),
        "--preset", "2nfe", "--sampler", "stochastic_ratio=0.5", "--size", f"{WIDTH}x{HEIGHT}", "--seed", "7",
        "--batch-size", "2", "--out", str(out), "--device", "cpu",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "s per image" in printed
    assert sorted(path.name for path in out.iterdir()) == ["0_7.png", "1_8.png"]
    for path, prompt, seed in ((out / "0_7.png", PROMPTS[0], 7), (out / "1_8.png", "a lighthouse at dusk", 8)):
        from PIL import Image

        with Image.open(path) as image:
            assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
        metadata = read_image_metadata(path)
        assert metadata["prompt"] == prompt and metadata["seed"] == str(seed)
        assert metadata["preset"] == "2nfe" and metadata["model"] == str(folders["z_image"])
        assert json.loads(metadata["sampler"])["stochastic_ratio"] == 0.5
        assert metadata["twinflow_version"]


def test_encode_command_then_generate_from_embeddings_without_text_encoder(folders, pipes, tmp_path):
    embeddings = tmp_path / "prompts.safetensors"
    assert main(["encode", "--model", str(folders["sd3"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--out", str(embeddings), "--device", "cpu"]) == 0
    stored = load_embeddings(embeddings)
    assert stored.prompts == PROMPTS[:2] and stored.family == "sd3" and stored.null_condition is not None
    out = tmp_path / "images"
    assert main(["generate", "--model", str(folders["sd3"]), "--embeddings", str(embeddings), "--size", f"{WIDTH}x{HEIGHT}",
                 "--seed", "3", "--out", str(out), "--device", "cpu"]) == 0
    expected = generate(pipes["sd3"], PROMPTS[:2], seed=3).images
    for index, image in enumerate(expected):
        from PIL import Image

        path = out / f"{index}_{3 + index}.png"
        assert read_image_metadata(path)["prompt"] == PROMPTS[index]
        with Image.open(path) as written:
            assert largest_difference(written.convert("RGB"), image) == 0


def test_command_errors_name_the_problem(folders, tmp_path, capsys):
    assert main(["generate", "--model", str(folders["z_image"]), "--prompt", "x", "--size", "30x16",
                 "--out", str(tmp_path / "a"), "--device", "cpu"]) == 2
    assert "30x16" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(tmp_path / "b")]) == 2
    assert "no model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folders["z_image"]), "--prompt", "x", "--size", "24", "--out", str(tmp_path)])


# -- seeds and batches -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ENCODED_FAMILIES)
def test_same_seed_same_image_different_seed_different_image(pipes, family):
    first = generate(pipes[family], PROMPTS[:1], seed=11)
    again = generate(pipes[family], PROMPTS[:1], seed=11)
    other = generate(pipes[family], PROMPTS[:1], seed=12)
    assert first.seeds == [11] and first.images[0].size == (WIDTH, HEIGHT)
    assert largest_difference(first.images[0], again.images[0]) == 0
    assert largest_difference(first.images[0], other.images[0]) > 10


@pytest.mark.parametrize("family", ENCODED_FAMILIES)
def test_images_do_not_depend_on_their_batch(pipes, family):
    # 2nfe is stochastic (rho = 1): the fresh noise must come from each image's own stream too.
    batched = generate(pipes[family], seed=5, batch_size=2)
    alone = [generate(pipes[family], [prompt], seed=5 + index).images[0] for index, prompt in enumerate(PROMPTS)]
    assert batched.seeds == [5, 6, 7] and batched.prompts == PROMPTS and batched.network_calls == 2
    for image, expected in zip(batched.images, alone):
        assert largest_difference(image, expected) <= BATCH_TOLERANCE[family]


@pytest.mark.parametrize("family", ENCODED_FAMILIES)
def test_embeddings_give_the_same_images_as_prompts(pipes, folders, family, tmp_path):
    pipe = pipes[family]
    path = save_embeddings(tmp_path / "e.safetensors", pipe.encode(PROMPTS, batch_size=2), PROMPTS, family=family)
    without_encoder = TextToImage.from_pretrained(folders[family], device="cpu", load_text_encoder=False)
    assert without_encoder.encoder is None
    with pytest.raises(ValueError, match="no text encoder"):
        generate(without_encoder)
    from_file = generate(without_encoder, None, embeddings=path, seed=2, batch_size=3)
    from_prompts = generate(pipe, seed=2, batch_size=3)
    assert from_file.prompts == PROMPTS
    for image, expected in zip(from_file.images, from_prompts.images):
        assert largest_difference(image, expected) == 0


# -- guidance ----------------------------------------------------------------------------------


def test_guidance_uses_the_empty_prompt_as_null_condition(pipes, folders, tmp_path):
    pipe = pipes["z_image"]
    plain = generate(pipe, PROMPTS[:2], seed=1)
    guided = generate(pipe, PROMPTS[:2], seed=1, guidance_scale=3.0, batch_size=2)
    assert guided.network_calls == 2 * plain.network_calls == 4 and guided.settings["guidance_scale"] == 3.0
    assert largest_difference(plain.images[0], guided.images[0]) > 0
    # Stored embeddings carry the empty prompt's condition, so guidance works without the encoder.
    conditions, null = pipe.encode(PROMPTS[:2]), pipe.encode([""])
    without_encoder = TextToImage.from_pretrained(folders["z_image"], device="cpu", load_text_encoder=False)
    stored = PromptEmbeddings(conditions, PROMPTS[:2], null)
    again = generate(without_encoder, None, embeddings=stored, seed=1, guidance_scale=3.0, batch_size=2)
    assert all(largest_difference(a, b) == 0 for a, b in zip(again.images, guided.images))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(without_encoder, None, embeddings=conditions, guidance_scale=3.0)


def test_guidance_and_the_cache_use_the_reference_null_prompt_of_each_family(pipes, folders, tmp_path):
    """Qwen-Image and SD3's unconditional prompt is "Generate an image." (the reference's
    modeling_qwen_image.py / modeling_sd_3.py), Z-Image's the empty one; sampling-time guidance,
    `twinflow encode` and `twinflow cache` all take it from the family."""
    from twinflow.data import CachedLatents, CaptionedDataConfig
    from twinflow.train.prepare import cache_from_pipeline

    assert {name: FAMILIES[name].null_prompt for name in ENCODED_FAMILIES} == {
        "z_image": "", "sd3": "Generate an image.", "qwen_image": "Generate an image.", "sana": ""}
    for family in ENCODED_FAMILIES:
        pipe = pipes[family]
        null = pipe._null_condition(None)
        # Sana encodes its null prompt as SanaPipeline encodes the negative one: without the
        # complex human instruction that its prompts get (tests/test_sana.py).
        expected = pipe.encoder.encode_null() if family == "sana" else pipe.encode([FAMILIES[family].null_prompt])
        assert all(torch.equal(null[key], value) for key, value in expected.items()), family
    qwen = pipes["qwen_image"]
    reference, empty = qwen.encode(["Generate an image."])["prompt_embeds"], qwen.encode([""])["prompt_embeds"]
    assert reference.shape != empty.shape or not torch.equal(reference, empty)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * index, dtype=np.uint8)).save(images / f"{index}.png")
        (images / f"{index}.txt").write_text(f"caption {index}")
    cache, _ = cache_from_pipeline(
        folders["qwen_image"], CaptionedDataConfig(source="folder", root=images, image_size=16), tmp_path / "cache",
        device="cpu", progress=False,
    )
    stored = CachedLatents(tmp_path / "cache").null_condition
    expected = qwen.encode(["Generate an image."])
    assert torch.allclose(stored["prompt_embeds"][:, : expected["prompt_embeds"].shape[1]].float(), expected["prompt_embeds"].float())


@pytest.mark.parametrize("family", ENCODED_FAMILIES)
def test_one_family_definition_drives_caching_and_generation(pipes, folders, family, tmp_path):
    """A cached caption is the prompt generation encodes, mask included: `twinflow cache` and
    TextToImage both go through twinflow.families (issue 15). The cache stores each shard
    padded to its longest caption; the row's own tokens and mask must equal generation's (the
    cache encodes captions in batches: equal up to the rounding of batched kernels)."""
    from twinflow.data import CachedLatents, CaptionedDataConfig
    from twinflow.train.prepare import cache_from_pipeline

    captions = ["a red fox in the snow", "fruit", "an astronaut riding a horse on the moon"]
    images = tmp_path / "images"
    images.mkdir()
    for index, caption in enumerate(captions):
        Image.fromarray(np.full((16, 16, 3), 40 * index, dtype=np.uint8)).save(images / f"{index}.png")
        (images / f"{index}.txt").write_text(caption)
    cache_from_pipeline(folders[family], CaptionedDataConfig(source="folder", root=images, image_size=16),
                        tmp_path / "cache", device="cpu", progress=False)
    cache = CachedLatents(tmp_path / "cache")
    for index, caption in enumerate(captions):
        _, cached = cache[index]
        encoded = {key: value[0] for key, value in pipes[family].encode([caption]).items()}
        assert set(cached) == set(encoded), family
        length = encoded["prompt_embeds"].shape[0]
        if "prompt_embeds_mask" in cached:  # masked families: the padding beyond is masked out
            assert torch.equal(cached["prompt_embeds_mask"][:length], encoded["prompt_embeds_mask"])
            assert not cached["prompt_embeds_mask"][length:].any()
        else:
            assert cached["prompt_embeds"].shape[0] == length
        close = {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(cached["prompt_embeds"][:length].float(), encoded["prompt_embeds"].float(), **close)
        for key in set(encoded) - {"prompt_embeds", "prompt_embeds_mask"}:
            torch.testing.assert_close(cached[key].float(), encoded[key].float(), **close)


def test_max_sequence_length_sets_the_prompt_tokens(pipes, folders, tmp_path):
    """SD3 without T5 pads its CLIP tokens with max_sequence_length zero T5 tokens (256 by
    default); the option reaches generation, `twinflow encode` and `twinflow cache` alike."""
    from twinflow.generation import PromptEncoder

    default = pipes["sd3"].encode(["fruit"])["prompt_embeds"].shape[1]
    short = PromptEncoder(pipes["sd3"].pipeline, FAMILIES["sd3"], torch.device("cpu"), 3).encode(["fruit"])["prompt_embeds"]
    assert default - short.shape[1] == 256 - 3
    out = tmp_path / "short.safetensors"
    assert main(["encode", "--model", str(folders["sd3"]), "--prompt", "fruit", "--max-sequence-length", "3",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert load_embeddings(out).conditions["prompt_embeds"].shape[1] == short.shape[1]


def test_z_image_prompts_are_encoded_up_to_1024_tokens(pipes):
    """The reference encodes Z-Image prompts up to 1024 tokens; diffusers' default stops at 512."""
    long_prompt = " ".join(["fox"] * 700)
    embeds = pipes["z_image"].encode([long_prompt])["prompt_embeds"]
    assert 512 < embeds.shape[1] <= 1024


# -- errors ------------------------------------------------------------------------------------


def test_bad_size_names_the_numbers(pipes):
    with pytest.raises(ValueError, match=r"26x16 .* divisible by 4 = VAE factor 2 x patch size 2.* 24x16"):
        generate(pipes["sd3"], PROMPTS[:1], width=26)
    with pytest.raises(ValueError, match="height must be an integer >= 4"):
        generate(pipes["sd3"], PROMPTS[:1], height=0)


def test_missing_folder_parts_and_unknown_family_are_named(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        TextToImage.from_pretrained(tmp_path / "nowhere", device="cpu")
    broken = shutil.copytree(folders["z_image"], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="no vae/ subfolder"):
        TextToImage.from_pretrained(broken, device="cpu")
    shutil.copytree(folders["z_image"] / "vae", broken / "vae")
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="text_encoder has no .safetensors"):
        TextToImage.from_pretrained(broken, device="cpu")
    with pytest.raises(FileNotFoundError, match="text_encoder has no .safetensors"):
        PromptEncoder.from_pretrained(broken, device="cpu")
    (broken / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        TextToImage.from_pretrained(broken, device="cpu")
    unknown = shutil.copytree(folders["flux"], tmp_path / "unknown")
    index = json.loads((unknown / "model_index.json").read_text())
    (unknown / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="unknown family.*StableDiffusionXLPipeline"):
        TextToImage.from_pretrained(unknown, device="cpu")


def test_offload_needs_cuda(folders):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TextToImage.from_pretrained(folders["flux"], device="cpu", offload=True)


# -- adapter weights and folders without a text encoder ----------------------------------------


def test_extra_weights_in_the_folder_are_used_and_absent_ones_warned(folders, pipes):
    from safetensors import safe_open

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no copy-initialisation warning
        pipe = TextToImage.from_pretrained(folders["flux"], device="cpu")
    with safe_open(str(next((folders["flux"] / "transformer").glob("*.safetensors"))), "pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith("time_text_embed_2.")}
    loaded = pipe.adapter.transformer.state_dict()
    assert stored and all(torch.equal(loaded[key], value) for key, value in stored.items())
    first = {key.replace("_2.", ".", 1): loaded[key.replace("_2.", ".", 1)] for key in stored}
    assert not all(torch.equal(value, stored[key.replace(".", "_2.", 1)]) for key, value in first.items())

    with pytest.warns(UserWarning, match=COPY_WARNING):
        plain = TextToImage.from_pretrained(folders["z_image_plain"], device="cpu")
    state = plain.adapter.transformer.state_dict()
    second = [key for key in state if key.startswith("t_embedder_2.")]
    assert second and all(torch.equal(state[key], state[key.replace("t_embedder_2.", "t_embedder.")]) for key in second)


def test_folder_without_text_encoder_generates_from_embeddings(folders, tmp_path):
    pipe = TextToImage.from_pretrained(folders["flux"], device="cpu")
    assert pipe.encoder is None
    with pytest.raises(ValueError, match="no text encoder.*embeddings"):
        generate(pipe)
    with pytest.raises(FileNotFoundError, match="no text encoder"):
        PromptEncoder.from_pretrained(folders["flux"], device="cpu")
    generator = torch.Generator().manual_seed(0)
    conditions = {"prompt_embeds": torch.randn(2, 6, 16, generator=generator),
                  "pooled_prompt_embeds": torch.randn(2, 16, generator=generator)}
    result = generate(pipe, None, embeddings=conditions, preset="1nfe", seed=4)
    assert [image.size for image in result.images] == [(WIDTH, HEIGHT)] * 2
    assert result.prompts == [None, None] and result.seeds == [4, 5] and result.network_calls == 1
    paths = save_images(result, tmp_path, start=10)
    assert [path.name for path in paths] == ["10_4.png", "11_5.png"] and read_image_metadata(paths[0])["prompt"] == ""


# -- pieces --------------------------------------------------------------------------------------


def test_embeddings_file_round_trip_and_family_check(pipes, tmp_path):
    conditions = pipes["qwen_image"].encode(PROMPTS[:2])
    null = pipes["qwen_image"].encode([""])
    path = save_embeddings(tmp_path / "q.safetensors", conditions, PROMPTS[:2], null_condition=null, family="qwen_image")
    stored = load_embeddings(path)
    assert stored.prompts == PROMPTS[:2] and len(stored) == 2 and stored.family == "qwen_image"
    assert all(torch.equal(stored.conditions[key], value) for key, value in conditions.items())
    assert all(torch.equal(stored.null_condition[key], value) for key, value in null.items())
    with pytest.raises(ValueError, match="encoded for qwen_image"):
        generate(pipes["z_image"], None, embeddings=stored)
    with pytest.raises(ValueError, match="3 prompts for 2 rows"):
        save_embeddings(tmp_path / "bad.safetensors", conditions, PROMPTS)
    with pytest.raises(ValueError, match="safetensors"):
        save_embeddings(tmp_path / "bad.pt", conditions)


def test_sampler_rows_with_their_own_generators_match_rows_alone():
    def model(x, t, r, condition):
        return x * 0.5 + condition

    noise, condition = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    config = sampler_config("4nfe")
    batched = sample(model, noise, condition, config, generator=[torch.Generator().manual_seed(s) for s in range(3)])
    for row in range(3):
        alone = sample(model, noise[row:row + 1], condition[row:row + 1], config,
                       generator=[torch.Generator().manual_seed(row)])
        assert torch.equal(batched.sample[row:row + 1], alone.sample)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(model, noise, condition, config, generator=[torch.Generator()] * 2)


def test_speed_benchmark_runs_on_tiny_models(capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generation_speed.py"
    spec = importlib.util.spec_from_file_location("generation_speed", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--families", "z_image", "--nfe", "1,2", "--repeats", "1", "--size", "16"]) == 0
    table = capsys.readouterr().out
    assert "tiny random configurations on the CPU" in table
    assert "| z_image | 1 | `1nfe` |" in table and "| z_image | 2 | `2nfe` |" in table


def test_hub_ids_are_fetched_safetensors_only_and_paths_never(monkeypatch, tmp_path):
    import huggingface_hub

    from twinflow.generation.loading import HUB_FILES, resolve_model_folder

    calls = []

    def fake_download(repo_id, allow_patterns, **options):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_folder(tmp_path) == tmp_path and not calls  # an existing folder stays local
    assert resolve_model_folder("missing/../folder") == Path("missing/../folder") and not calls
    assert resolve_model_folder("inclusionAI/TwinFlow-Z-Image-Turbo") == tmp_path
    assert calls == [("inclusionAI/TwinFlow-Z-Image-Turbo", HUB_FILES)]
    assert not any(pattern.endswith((".bin", ".pt", ".py", ".pth", ".ckpt")) for pattern in HUB_FILES)

    def offline(repo_id, allow_patterns, **options):
        raise OSError("no internet")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub model"):
        resolve_model_folder("owner/model")
