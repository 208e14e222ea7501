"""Qwen-Image-Edit and Edit-Plus (QwenImageEditPipeline, QwenImageEditPlusPipeline) through the
shared adapter, family, cache, loop, export and generate code, on tiny random models built
offline (issue 16).

The pipelines resize every source to about 1024^2 pixels; here the tests shrink that area
(``source_area`` on our side, the pipelines' own size rule patched on theirs) so that a tiny
model runs in a second.
"""

from __future__ import annotations

import warnings

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
    assert area_size(area, width, height) == pipeline_qwenimage_edit_plus.calculate_dimensions(area, width / height)
    assert area_size(area, width, height) == pipeline_qwenimage_edit.calculate_dimensions(area, width / height)[:2]


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
