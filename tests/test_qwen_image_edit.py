"""Qwen-Image-Edit and Edit-Plus (QwenImageEditPipeline, QwenImageEditPlusPipeline) through the
shared adapter, family, cache, loop, export and generate code, on tiny random models built
offline (issue 16).

The pipelines resize every source to about 1024^2 pixels; here the tests shrink that area
(``source_area`` on our side, the pipelines' own size rule patched on theirs) so that a tiny
model runs in a second.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus  # noqa: E402

from twinflow.adapters.base import pack_patches  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.families import PIPELINE_FAMILIES  # noqa: E402
from twinflow.families.qwen_image_edit import IMAGE_TOKEN, VisionPromptProcessor, area_size  # noqa: E402
from twinflow.generation import TextToImage  # noqa: E402
from twinflow.generation.loading import load_pipeline  # noqa: E402
from twinflow.testing import build_tiny_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

AREA = 32 * 32  # the tests' source area (the pipelines': 1024 * 1024)
SHRINK = 1024 * 1024 // AREA
PROMPT = "make the sky red"
KINDS = ("qwen_image_edit", "qwen_image_edit_plus", "qwen_image_edit_2511")


def _image(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def _sources(kind: str) -> list[Image.Image]:
    """One source for Edit; two of different aspect ratios for Plus (Picture 1, Picture 2)."""
    return [_image(0)] if kind == "qwen_image_edit" else [_image(0), _image(1, 40, 56)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    made = {}
    for kind in KINDS:
        made[kind] = build_tiny_folder(root / kind, kind, seed=0)
        made[kind, "extra"] = build_tiny_folder(root / f"{kind}_extra", kind, seed=0, extra_weights=True)
    return made


def _model(folder) -> TextToImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copy-initialised emb_2
        return TextToImage.from_pretrained(folder, device="cpu")


# -- sizes, processor ------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(48, 40), (1024, 1024), (1920, 1080), (300, 1200), (33, 31)])
@pytest.mark.parametrize("area", [1024 * 1024, 384 * 384, AREA])
def test_source_sizes_follow_the_pipelines_rule(width, height, area):
    theirs = pipeline_qwenimage_edit_plus.calculate_dimensions(area, width / height)
    assert theirs == pipeline_qwenimage_edit.calculate_dimensions(area, width / height)[:2]
    if min(theirs) == 0:  # the pipelines would fail later in a resize; named here
        with pytest.raises(ValueError, match="give a larger source area"):
            area_size(area, width, height)
    else:
        assert area_size(area, width, height) == theirs


def test_the_processor_expands_each_image_token_by_its_merged_patches(folders):
    processor = VisionPromptProcessor.from_folder(folders["qwen_image_edit_plus"])
    images = [_image(0, 60, 60), _image(1, 120, 64)]
    text = f"Picture 1: {IMAGE_TOKEN} Picture 2: {IMAGE_TOKEN} {PROMPT}"
    inputs = processor(text=[text], images=images, padding=True, return_tensors="pt")
    vision = processor.image_processor(images=images, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], vision["pixel_values"])
    assert torch.equal(inputs["image_grid_thw"], vision["image_grid_thw"])
    # Written out: Qwen2VLProcessor's rule, grid t * h * w / merge_size^2 tokens per image.
    counts = [int(t * h * w) // 4 for t, h, w in vision["image_grid_thw"].tolist()]
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(pad) == sum(counts) and counts[0] != counts[1]
    expected = text.replace(IMAGE_TOKEN, "\0", 1).replace(IMAGE_TOKEN, IMAGE_TOKEN * counts[1]).replace("\0", IMAGE_TOKEN * counts[0])
    assert ids == processor.tokenizer(expected)["input_ids"]
    with pytest.raises(ValueError, match="more <|image_pad|>"):
        processor(text=[text], images=images[:1])
    with pytest.raises(ValueError, match="2 images for fewer"):
        processor(text=[f"{IMAGE_TOKEN} {PROMPT}"], images=images)


# -- the pipeline's own call, step for step ---------------------------------------------------


class Recorder:
    """The keyword inputs and the output of every call of a transformer."""

    def __init__(self, transformer):
        self.calls = []
        transformer.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.calls.append(({key: value for key, value in kwargs.items()}, output[0]))


@pytest.fixture
def small_pipeline_sizes(monkeypatch):
    """The pipelines' 1024^2 source area shrunk to AREA (Plus: its constants; Edit: a literal)."""
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", AREA)
    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: original(area // SHRINK, ratio))


@pytest.mark.parametrize("kind", KINDS)
def test_the_sequence_layout_and_the_output_equal_the_pipelines(kind, folders, small_pipeline_sizes):
    """The diffusers pipeline (one step at t = 1) and ``generate`` feed its transformer the same
    tokens (noise then sources), ``img_shapes``, prompt and time; at r = t the adapter's output is
    the pipeline's, sliced back to the noise tokens (fp32, exact)."""
    loaded = load_pipeline(folders[kind], device="cpu")
    pipeline, sources = loaded.pipeline, _sources(kind)
    width, height = 32, 24
    theirs = Recorder(pipeline.transformer)
    pipeline(image=sources if len(sources) > 1 else sources[0], prompt=PROMPT, num_inference_steps=1, height=height,
             width=width, true_cfg_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(5))
    model = _model(folders[kind])
    ours = Recorder(model.adapter.transformer)
    result = model.generate([PROMPT], images=sources, preset="1nfe", width=width, height=height, seed=5,
                            source_area=AREA, progress=False)
    assert result.settings["source_sizes"] == [list(area_size(AREA, *source.size)) for source in sources]
    (their_inputs, their_output), (our_inputs, _) = theirs.calls[0], ours.calls[0]
    assert their_inputs["img_shapes"] == our_inputs["img_shapes"] and len(our_inputs["img_shapes"][0]) == 1 + len(sources)
    for key in ("hidden_states", "encoder_hidden_states", "timestep"):
        assert torch.equal(their_inputs[key], our_inputs[key]), key
    assert their_inputs["encoder_hidden_states_mask"] is None and our_inputs.get("encoder_hidden_states_mask") is None

    # r = t: the adapter is the unmodified transformer, called as the pipeline calls it.
    edit = model._edit_sources(sources, None, AREA)
    condition = model._prepare(edit.condition(model, [PROMPT]))
    noise = torch.randn((1, 4, height // 2, width // 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        velocity = model.adapter(noise, torch.ones(1), torch.ones(1), condition)
    tokens = pack_patches(noise, 2).shape[1]
    assert torch.equal(pack_patches(velocity, 2), their_output[:, :tokens])


@pytest.mark.parametrize("kind", KINDS)
def test_the_prompt_and_null_prompt_see_the_source_images(kind, folders):
    model = _model(folders[kind])
    family, pipeline = model.family, model.pipeline
    edit = model._edit_sources(_sources(kind), None, AREA)
    condition = family.encode_edit(pipeline, [PROMPT], edit.prompt_images, model.device)
    image = edit.prompt_images if kind != "qwen_image_edit" else edit.prompt_images[0]
    embeds, mask = pipeline.encode_prompt(prompt=[PROMPT], image=image, device=model.device)
    assert mask is None and torch.equal(condition["prompt_embeds"], embeds) and bool(condition["prompt_embeds_mask"].all())
    null = family.encode_null_edit(pipeline, edit.prompt_images, model.device)
    expected, _ = pipeline.encode_prompt(prompt=["Edit this image."], image=image, device=model.device)
    assert torch.equal(null["prompt_embeds"], expected)
    other = model._edit_sources([_image(7)] * len(_sources(kind)), None, AREA)
    changed = family.encode_null_edit(pipeline, other.prompt_images, model.device)
    assert not torch.equal(changed["prompt_embeds"], null["prompt_embeds"])  # the image is in the prompt


@pytest.mark.parametrize("kind", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_the_edit_depends_on_the_source_image_and_the_extra_weights(kind, folders):
    images = {}
    for name, folder in (("base", folders[kind]), ("extra", folders[kind, "extra"])):
        model = _model(folder)
        for preset in ("1nfe", "2nfe"):
            for seed in (0, 3):  # the source image's seed
                sources = [_image(seed)] + _sources(kind)[1:]
                result = model.generate([PROMPT], images=sources, preset=preset, seed=1, source_area=AREA, progress=False)
                assert result.network_calls == int(preset[0])
                assert result.images[0].size == area_size(AREA, *sources[-1 if kind != "qwen_image_edit" else 0].size)
                images[name, preset, seed] = np.asarray(result.images[0], dtype=np.int16)
    for name in ("base", "extra"):
        for preset in ("1nfe", "2nfe"):
            assert not np.array_equal(images[name, preset, 0], images[name, preset, 3]), (name, preset)
    assert not np.array_equal(images["base", "2nfe", 0], images["extra", "2nfe", 0])


def test_edit_inputs_that_cannot_work_are_named(folders, tmp_path):
    edit, plus = _model(folders["qwen_image_edit"]), _model(folders["qwen_image_edit_plus"])
    with pytest.raises(ValueError, match="needs a source image"):
        edit.generate([PROMPT], progress=False)
    with pytest.raises(ValueError, match="at most 1 source"):
        edit.generate([PROMPT], images=[_image(0), _image(1)], source_area=AREA, progress=False)
    with pytest.raises(ValueError, match="at most 4 source"):
        plus.generate([PROMPT], images=[_image(0)] * 5, source_area=AREA, progress=False)
    with pytest.raises(ValueError, match="give prompts, not embeddings"):
        edit.generate(embeddings={"prompt_embeds": torch.zeros(1, 3, 16)}, images=[_image(0)], progress=False)
    with pytest.raises(FileNotFoundError, match="source image not found"):
        edit.generate([PROMPT], images=[str(tmp_path / "missing.png")], progress=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot be read"):
        edit.generate([PROMPT], images=[str(broken)], progress=False)
    with pytest.raises(ValueError, match="rounds to 0x0: sides are multiples of 32"):
        edit.generate([PROMPT], images=[_image(0)], source_area=100, progress=False)
    text_to_image = build_tiny_folder(tmp_path / "t2i", "qwen_image")
    with pytest.raises(ValueError, match="does not edit images"):
        _model(text_to_image).generate([PROMPT], images=[_image(0)], width=16, height=16, progress=False)
    assert PIPELINE_FAMILIES["QwenImageEditPipeline"].edits and not PIPELINE_FAMILIES["QwenImagePipeline"].edits


def _run(*arguments) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([str(argument) for argument in arguments])


def test_generate_command_edits_the_given_images(folders, tmp_path, capsys):
    paths = []
    for index, seed in enumerate((0, 4)):
        path = tmp_path / f"source_{index}.png"
        _image(seed).save(path)
        paths.append(path)
    common = ("generate", "--model", folders["qwen_image_edit_plus", "extra"], "--prompt", PROMPT, "--preset", "1nfe",
              "--source-area", AREA, "--device", "cpu")
    assert _run(*common, "--image", paths[0], "--image", paths[1], "--out", tmp_path / "two") == 0
    assert "32x32" in capsys.readouterr().out
    assert _run(*common, "--image", paths[0], "--out", tmp_path / "one", "--size", "16x24") == 0
    one, two = (np.asarray(Image.open(tmp_path / name / "0_0.png"), dtype=np.int16) for name in ("one", "two"))
    assert one.shape == (24, 16, 3) and two.shape == (32, 32, 3)
    assert _run(*common, "--image", tmp_path / "nothing.png", "--out", tmp_path / "none") == 2
    assert "--image" in capsys.readouterr().err
    # Prompts alone have no edit condition: encode refuses, naming what to do instead.
    assert _run("encode", "--model", folders["qwen_image_edit"], "--prompt", PROMPT, "--device", "cpu",
                "--out", tmp_path / "prompts.safetensors") == 2
    assert "encodes an instruction together with its source images" in capsys.readouterr().err
    assert not (tmp_path / "prompts.safetensors").exists()


# -- training ---------------------------------------------------------------------------------


def test_every_call_of_the_objective_pairs_a_sample_with_its_own_source():
    """The fake slice, the rectification (Delta_v) and the guidance target's conditional and
    null rows all see each sample's own source latents: every row the network gets carries a
    prompt (or null prompt) and a source of the same sample."""
    from twinflow.objective import TwinFlowObjective, objective_config

    count = 16
    ids = torch.arange(count, dtype=torch.float32)
    sources = (ids + 100)[:, None, None, None].expand(count, 4, 4, 4).clone()
    condition = {"prompt_embeds": ids[:, None, None].expand(count, 3, 16).clone(), "image_latents": sources}
    null = {"prompt_embeds": -(ids + 1)[:, None, None].expand(count, 3, 16).clone(), "image_latents": sources}
    weight = torch.nn.Parameter(torch.ones(()))
    rows = {"conditional": 0, "null": 0}

    def network(x, time, target_time, given):
        prompt = given["prompt_embeds"][:, 0, 0]
        owner = torch.where(prompt >= 0, prompt, -prompt - 1)
        assert torch.equal(owner, given["image_latents"][:, 0, 0, 0] - 100)
        rows["conditional"] += int((prompt >= 0).sum())
        rows["null"] += int((prompt < 0).sum())
        return x * weight

    objective = TwinFlowObjective(objective_config("twinflow", guidance_ratio=0.5, rectify_coefficient=0.5))
    result = objective(network, torch.randn(count, 4, 4, 4), condition, null, generator=torch.Generator().manual_seed(0))
    result.loss.backward()
    assert rows["null"] > 0 and rows["conditional"] > 2 * count and weight.grad is not None


class EditPairs:
    """Edit triplets of latents (the identity is the VAE): a fixed instruction, a source that is a
    horizontal or a vertical ramp, and the target, the source negated (plus noise of std 0.05).
    Only the source says which target is right."""

    description = "negate the source ramp"

    def __init__(self, count: int = 16) -> None:
        from tiny_text_to_image import CHANNELS, SIZE

        ramp = torch.linspace(-1, 1, SIZE)[None, :, None].expand(CHANNELS, SIZE, SIZE)
        self.patterns = torch.stack([ramp, ramp.transpose(1, 2)])
        generator = torch.Generator().manual_seed(0)
        self.sources = self.patterns[torch.arange(count) % 2]
        self.images = -self.sources + 0.05 * torch.randn(self.sources.shape, generator=generator)
        self.captions = ["negate it"] * count

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, indices: torch.Tensor):
        return self.images[indices], [self.captions[int(index)] for index in indices], self.sources[indices].unsqueeze(1)


def encode_edits(captions, sources):
    """EditEncoder's keys for :class:`EditPairs`: the caption's embedding, the sources as they are
    and each item's null condition (the empty prompt)."""
    from tiny_text_to_image import encode_prompts

    encoded = encode_prompts(captions)
    null = encode_prompts([""] * len(captions))
    return {**encoded, "image_latents": sources[:, 0].clone(), **{f"null.{key}": value for key, value in null.items()}}


def one_step_edit_scores(network, pairs: EditPairs) -> tuple[float, float]:
    """Mean squared distance of 1-NFE edits to the right target (the negated source), and the
    fraction nearer to it than to the other pattern's target (8 edits per source pattern)."""
    from tiny_text_to_image import encode_prompts

    from twinflow.sampler import sample, sampler_config

    sources = pairs.patterns[torch.arange(16) % 2]
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(sources.shape, generator=generator)
    condition = {**encode_prompts(["negate it"] * 16), "image_latents": sources}
    with torch.no_grad():
        edits = sample(network, noise, condition, sampler_config("1nfe"), generator=generator).sample
    own, other = -sources, -pairs.patterns[1 - torch.arange(16) % 2]
    distance_own = ((edits - own) ** 2).mean(dim=(1, 2, 3))
    distance_other = ((edits - other) ** 2).mean(dim=(1, 2, 3))
    return float(distance_own.mean()), float((distance_own < distance_other).float().mean())


def test_a_short_twinflow_run_learns_one_step_edits(tmp_path):
    """A random tiny Qwen-Image transformer learns, from edit triplets cached with per-item null
    conditions, to follow the source: 1-NFE edits move to the right target."""
    from safetensors.torch import load_file
    from tiny_text_to_image import TINY, identity, save_tiny_transformer

    from twinflow.adapters import load_adapter
    from twinflow.data import cache_dataset
    from twinflow.train.config import load_config
    from twinflow.train.loop import train

    pairs = EditPairs()
    transformer = save_tiny_transformer(tmp_path / "transformer", "qwen_image")
    cache = cache_dataset(pairs, identity, encode_edits, tmp_path / "cache", shard_size=16, batch_size=8, progress=False)
    assert "null.prompt_embeds" in cache.condition_keys and cache.null_condition is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = load_adapter(transformer).eval()
    distance_before, right_before = one_step_edit_scores(network, pairs)
    config = load_config(TINY, [
        f"model.path={transformer}", f"data.root={tmp_path / 'cache'}", f"phases.0.steps={EDIT_STEPS}",
        "training.learning_rate=3e-3", "training.batch_size=8", "training.checkpoint_every=0", "training.log_every=50",
        "training.gradient_checkpointing=false",
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, tmp_path / "run")
    network.load_state_dict(load_file(str(result.final_checkpoint / "model.safetensors")))
    distance_after, right_after = one_step_edit_scores(network, pairs)
    assert distance_after < 0.5 * distance_before, (distance_before, distance_after)
    assert right_before < 0.8 and right_after == 1.0, (right_before, right_after)


EDIT_STEPS = 100


def _write_sources(folder: Path, names: list[str], seed: int, suffix: str = ".jpg") -> Path:
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(generator.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / f"{name}{suffix}")
    return folder


def test_edit_triplets_from_a_folder_and_from_parquet(tmp_path):
    """Sources are found by name in each source folder (any image suffix) or read from parquet
    columns, scaled and cropped to the target's size; a missing or corrupt source is counted and
    skipped, or an error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny_text_to_image import write_captioned_images

    from twinflow.data import CaptionedDataConfig, load_captioned

    targets = write_captioned_images(tmp_path / "targets", 5, (20, 18))
    first = _write_sources(tmp_path / "first", ["0", "1", "2", "3"], seed=1)  # "4" has no source
    second = _write_sources(tmp_path / "second", ["0", "1", "2", "3", "4"], seed=2, suffix=".png")
    (second / "2.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="2 bad items"):
        dataset = load_captioned(CaptionedDataConfig(root=str(targets), image_size=16, source_roots=(str(first), str(second))))
    assert len(dataset) == 3 and dataset.report.counts == {"missing source image": 1, "corrupt source image": 1}
    images, captions, sources = dataset[torch.tensor([0, 2])]
    assert images.shape == (2, 3, 16, 16) and sources.shape == (2, 2, 3, 16, 16) and captions[1] == "a photo of a fox number 3"
    assert not torch.equal(sources[:, 0], sources[:, 1]) and float(sources.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="missing source image.*4.png"):
        load_captioned(CaptionedDataConfig(root=str(targets), image_size=16, source_roots=(str(first),), on_error="error"))
    with pytest.raises(ValueError, match="source_columns is for the other source"):
        CaptionedDataConfig(root=str(targets), source_columns=("source",))

    def encoded(path):
        return {"bytes": Path(path).read_bytes(), "path": None}

    table = pa.table({
        "text": ["turn it red", "turn it blue", "no source"],
        "image": [encoded(targets / f"{index}.png") for index in range(3)],
        "source": [encoded(first / "0.jpg"), encoded(first / "1.jpg"), None],
    })
    pq.write_table(table, tmp_path / "triplets.parquet")
    with pytest.warns(UserWarning, match="1 bad items"):
        rows = load_captioned(CaptionedDataConfig(source="parquet", root=str(tmp_path / "triplets.parquet"), image_size=16,
                                                  source_columns=("source",)))
    _, captions, sources = rows[torch.tensor([0, 1])]
    assert captions == ["turn it red", "turn it blue"] and sources.shape == (2, 1, 3, 16, 16)
    assert torch.equal(sources[0, 0], dataset[0][2][0])  # the same source file, decoded the same way
    with pytest.raises(ValueError, match="no column.*'missing'"):
        load_captioned(CaptionedDataConfig(source="parquet", root=str(tmp_path / "triplets.parquet"), source_columns=("missing",)))


def _train(base: Path, cache: Path, run: Path, *overrides: str) -> None:
    from tiny_text_to_image import TINY

    sets = [f"model.path={base / 'transformer'}", f"data.root={cache}", "training.learning_rate=1e-2", *overrides]
    assert _run("train", "--config", TINY, "--out", run, *[item for value in sets for item in ("--set", value)]) == 0


@pytest.mark.parametrize("kind", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_cache_train_resume_export_generate_full_and_lora(kind, folders, tmp_path):
    from safetensors.torch import load_file
    from tiny_text_to_image import LORA, write_captioned_images

    from twinflow.adapters import read_export_metadata
    from twinflow.data import CachedLatents
    from twinflow.data.image_decoding import resize_center_crop
    from twinflow.train.checkpoint import checkpoint_folder, list_checkpoints

    base = folders[kind]
    targets = write_captioned_images(tmp_path / "targets", 6, (20, 18))
    names = [str(index) for index in range(6)]
    roots = [_write_sources(tmp_path / f"sources_{number}", names, seed=number) for number in range(1 if kind == "qwen_image_edit" else 2)]
    cache = tmp_path / "cache"
    arguments = [item for root in roots for item in ("--edit-source", root)]
    assert _run("cache", "--model", base, "--data", targets, *arguments, "--size", 16, "--out", cache, "--batch-size", 4,
                "--device", "cpu") == 0
    cached = CachedLatents(cache)
    assert {"image_latents", "null.prompt_embeds", "null.prompt_embeds_mask"} <= set(cached.condition_keys)
    assert ("image_latents_2" in cached.condition_keys) == (len(roots) == 2) and cached.null_condition is None
    # The cached condition is the one generation builds for the same sources at the cache's size.
    model = _model(base)
    family, pipeline = model.family, model.pipeline
    cropped = [resize_center_crop(Image.open(root / "0.jpg").convert("RGB"), 16, 16) for root in roots]
    prompt_images = family.prompt_images(pipeline, cropped, [image.size for image in cropped])
    pixels = [pipeline.image_processor.preprocess(image, 16, 16) for image in cropped]
    _, condition = cached[0]
    latents = family.encode_sources(pipeline, pixels, torch.float32)
    assert torch.allclose(condition["image_latents"], latents["image_latents"][0], atol=1e-6)
    for prefix, prompt in (("", "a photo of a fox number 0"), ("null.", family.null_prompt)):
        expected = family.encode_edit(pipeline, [prompt], prompt_images, model.device)["prompt_embeds"][0]
        length = int(condition[f"{prefix}prompt_embeds_mask"].sum())
        assert length == expected.shape[0] and torch.allclose(condition[f"{prefix}prompt_embeds"][:length], expected, atol=1e-6)

    # Full parameters: 4 steps uninterrupted == 2 steps, stop, resume to 4 (bitwise).
    uninterrupted, resumed = tmp_path / "run", tmp_path / "resumed"
    _train(base, cache, uninterrupted)
    _train(base, cache, resumed)
    shutil.rmtree(checkpoint_folder(resumed, 4))
    assert list_checkpoints(resumed)[-1] == checkpoint_folder(resumed, 2)
    assert _run("train", "--out", resumed, "--resume") == 0
    for name in ("model.safetensors", "ema.safetensors"):
        expected, got = (load_file(str(checkpoint_folder(run, 4) / name)) for run in (uninterrupted, resumed))
        assert expected.keys() == got.keys() and any(key.startswith("transformer.time_text_embed_2.") for key in got)
        assert all(torch.equal(got[key], value) for key, value in expected.items()), name

    export = tmp_path / "export"
    assert _run("export", "--checkpoint", uninterrupted, "--out", export) == 0
    assert read_export_metadata(export / "transformer")["step"] == 4
    assert (export / "processor" / "preprocessor_config.json").is_file()
    image_arguments = [item for root in roots for item in ("--image", root / "1.jpg")]
    outputs = {}
    for name, folder, extra in (("full", export, ()), ("base", base, ()), ("lora", base, ("--lora", tmp_path / "lora_export"))):
        if name == "lora":
            _train(base, cache, tmp_path / "lora", LORA, "phases.0.steps=2")
            assert _run("export", "--checkpoint", tmp_path / "lora", "--out", tmp_path / "lora_export") == 0
        out = tmp_path / f"images_{name}"
        assert _run("generate", "--model", folder, *image_arguments, "--prompt", "a fox", "--size", "16x16", "--source-area", AREA,
                    "--preset", "1nfe", "--seed", 7, "--device", "cpu", "--out", out, *extra) == 0
        outputs[name] = np.asarray(Image.open(out / "0_7.png"), dtype=np.int16)
    assert outputs["full"].shape == (16, 16, 3)
    assert not np.array_equal(outputs["full"], outputs["base"]) and not np.array_equal(outputs["lora"], outputs["base"])


def test_cache_refuses_triplets_for_a_text_to_image_model_and_plain_images_for_an_edit_model(folders, tmp_path, capsys):
    from tiny_text_to_image import write_captioned_images

    targets = write_captioned_images(tmp_path / "targets", 2, (16, 16))
    sources = _write_sources(tmp_path / "sources", ["0", "1"], seed=0)
    text_to_image = build_tiny_folder(tmp_path / "t2i", "qwen_image")
    common = ("cache", "--data", targets, "--size", 16, "--device", "cpu")
    assert _run(*common, "--model", text_to_image, "--edit-source", sources, "--out", tmp_path / "a") == 2
    assert "not an edit pipeline" in capsys.readouterr().err
    assert _run(*common, "--model", folders["qwen_image_edit"], "--out", tmp_path / "b") == 2
    assert "give the source images" in capsys.readouterr().err
    assert _run(*common, "--model", folders["qwen_image_edit"], "--edit-source", sources, "--edit-source", sources,
                "--out", tmp_path / "c") == 2
    assert "at most 1 source" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_the_edit_lora_recipe_plans_qwen_image_edit_2511_with_its_source_tokens(tmp_path):
    """diffusers' QwenImageTransformer2DModel defaults are Qwen-Image's 20B widths; with
    ``zero_cond_t`` it is Edit-2511's. The dry run builds it on the meta device and counts each
    cached source's tokens into the activation estimate (a cache of real-width latents and text)."""
    from dry_runs import dry_run

    from twinflow.data import cache_dataset
    from twinflow.train.config import load_config

    with torch.device("meta"):
        transformer = diffusers.QwenImageTransformer2DModel(zero_cond_t=True)
    transformer.save_config(tmp_path / "model" / "transformer")

    class Triplets:
        def __len__(self):
            return 8

        def __getitem__(self, indices):
            return torch.zeros(len(indices), 16, 32, 48), ["edit"] * len(indices), torch.zeros(len(indices), 1, 16, 32, 48)

    def encode(captions, sources):
        embeds, mask = torch.zeros(len(captions), 20, 3584), torch.ones(len(captions), 20, dtype=torch.long)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "image_latents": sources[:, 0].clone(),
                "null.prompt_embeds": embeds[:, :12].clone(), "null.prompt_embeds_mask": mask[:, :12].clone()}

    cache_dataset(Triplets(), lambda images: images.clone(), encode, tmp_path / "cache", progress=False)
    recipe = Path(__file__).resolve().parent.parent / "configs" / "qwen_image_edit_lora_twinflow.yaml"
    code, stdout, stderr, plan = dry_run(recipe, tmp_path / "dry", "--world-size", "8", "--set", f"model.path={tmp_path / 'model'}",
                                         "--set", f"data.root={tmp_path / 'cache'}")
    assert code == 0, stderr
    assert plan.fsdp_units == {"QwenImageTransformerBlock": 60} and 20e9 < plan.transformer_parameters < 21e9
    assert plan.activations.tokens == 2 * (16 * 24) + 20  # target + source tokens (2 x 2 patches) + text
    assert "1 source image(s) per item" in stdout
    assert plan.lora_rank == 64 and plan.teacher == "ema adapter" and plan.lora_targets["to_add_out"] == 59
    objective = load_config(recipe)["phases"][0]["objective"]
    assert (objective["loss"], objective["guidance_ratio"]) == ("barron", 0.8)
