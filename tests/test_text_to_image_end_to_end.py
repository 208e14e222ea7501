"""Text-to-image end to end through the command line, as a user runs it, on a tiny random Z-Image
pipeline folder: ``twinflow cache`` (captioned images, one of them corrupt) -> ``twinflow train``
-> stop -> ``--resume`` -> ``twinflow export`` -> ``twinflow generate``; full-parameter and LoRA
(an adapter file for ``generate --lora``, or merged into a full pipeline folder)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from twinflow.adapters import METADATA_FILE, load_adapter, load_lora_export, read_export_metadata  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.generation import TextToImage  # noqa: E402
from twinflow.testing import build_tiny_folder  # noqa: E402
from twinflow.train.checkpoint import checkpoint_folder, list_checkpoints  # noqa: E402
from twinflow.train.export import export_diffusers  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_text_to_image.yaml"
SIZE = 16  # pixels: the tiny VAE halves it, the transformer takes 2 x 2 latent patches
PROMPT = "a red fox in the snow"
LORA = "training.lora={rank: 4, alpha: 8, target_modules: [to_q, to_k, to_v, to_out.0]}"


def _run(*arguments: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pretrained folder has no emb_2 yet: copy-initialised
        assert main([str(argument) for argument in arguments]) == 0, arguments


def _captioned_folder(folder: Path) -> Path:
    """Eight captioned colour images, one corrupt image and one image without a caption."""
    folder.mkdir()
    generator = np.random.default_rng(0)
    for index in range(8):
        pixels = generator.integers(0, 256, (24, 20, 3), dtype=np.uint8)  # not square: centre-cropped
        Image.fromarray(pixels).save(folder / f"image_{index}.png")
        (folder / f"image_{index}.txt").write_text(f"a photo of a fox number {index}")
    (folder / "broken.png").write_bytes(b"\x89PNG not really an image")
    (folder / "broken.txt").write_text("a broken image")
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(folder / "no_caption.png")
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_folder(tmp_path_factory.mktemp("base") / "z_image", "z_image")


@pytest.fixture(scope="module")
def cache(base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    images = _captioned_folder(folder / "images")
    _run("cache", "--model", base, "--data", images, "--size", SIZE, "--out", folder / "latents",
         "--batch-size", 4, "--device", "cpu")
    return folder / "latents"


def _train_arguments(base: Path, cache: Path, run: Path, *overrides: str) -> list:
    sets = [f"model.path={base / 'transformer'}", f"data.root={cache}", "training.learning_rate=1e-2", *overrides]
    return ["train", "--config", TINY, "--out", run, *[item for value in sets for item in ("--set", value)]]


def _generate(run_folder: Path, out: Path, *extra) -> Image.Image:
    _run("generate", "--model", run_folder, "--prompt", PROMPT, "--size", f"{SIZE}x{SIZE}", "--preset", "1nfe",
         "--seed", 7, "--device", "cpu", "--out", out, *extra)
    files = sorted(out.glob("*.png"))
    assert [file.name for file in files] == ["0_7.png"]
    return Image.open(files[0])


def test_cache_reports_the_bad_items_and_keeps_the_good(cache, base):
    index = json.loads((cache / "index.json").read_text())
    assert index["num_items"] == 8
    report = json.dumps(index)
    assert "broken.png" in report and "no_caption.png" in report
    assert (cache / "null_condition.safetensors").is_file()


@pytest.fixture(scope="module")
def full_run(base, cache, tmp_path_factory) -> Path:
    """4 steps uninterrupted, and the same stopped after step 2 and resumed: equal weights."""
    uninterrupted = tmp_path_factory.mktemp("full") / "run"
    _run(*_train_arguments(base, cache, uninterrupted))
    resumed = uninterrupted.with_name("resumed")
    _run(*_train_arguments(base, cache, resumed))
    shutil.rmtree(checkpoint_folder(resumed, 4))
    assert list_checkpoints(resumed)[-1] == checkpoint_folder(resumed, 2)
    _run("train", "--out", resumed, "--resume")
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(str(checkpoint_folder(uninterrupted, 4) / name))
        got = load_file(str(checkpoint_folder(resumed, 4) / name))
        assert all(torch.equal(got[key], value) for key, value in expected.items()), name
    return uninterrupted


def test_export_is_a_pipeline_folder_that_generate_loads(full_run, base, tmp_path):
    out = tmp_path / "export"
    _run("export", "--checkpoint", full_run, "--out", out)
    assert (out / "model_index.json").is_file() and (out / "vae").is_dir() and (out / "text_encoder").is_dir()
    assert read_export_metadata(out / "transformer")["step"] == 4
    # Trained from a base transformer: r = 0 is the data end of Z-Image's clock (continuous at
    # r = 0), recorded by the export and followed by loading, though transformer/ now holds
    # t_embedder_2 like a released checkpoint (which would read r = 0 the reference way).
    assert read_export_metadata(out / "transformer")["z_image_zero_time"] == "data"
    assert load_adapter(out).time_convention.zero_time == "data"
    image = np.asarray(_generate(out, tmp_path / "images"))
    assert image.shape == (SIZE, SIZE, 3)

    # The same image from the untouched base pipeline with the checkpoint's weights put in:
    # the export carried exactly the trained transformer (emb_2 included), nothing else changed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = TextToImage.from_pretrained(base, device="cpu")
    trained = load_file(str(checkpoint_folder(full_run, 4) / "model.safetensors"))
    pipe.adapter.load_state_dict(trained)
    expected = np.asarray(pipe.generate([PROMPT], preset="1nfe", width=SIZE, height=SIZE, seed=7, progress=False).images[0])
    assert np.array_equal(image, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untrained = TextToImage.from_pretrained(base, device="cpu")
    before = np.asarray(untrained.generate([PROMPT], preset="1nfe", width=SIZE, height=SIZE, seed=7, progress=False).images[0])
    assert not np.array_equal(image, before)  # training changed what the model draws


def test_export_refuses_an_existing_folder_and_leaves_it(full_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(full_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["keep.txt"]


def test_export_finds_the_pipeline_of_model_path_or_takes_one(full_run, base, tmp_path):
    bare = export_diffusers(full_run, tmp_path / "bare", pipeline=None)
    assert (bare / "model_index.json").is_file()  # model.path is base/transformer: its pipeline is found
    config = json.loads((checkpoint_folder(full_run, 4) / "state.json").read_text())["architecture"]["config"]
    assert Path(config["path"]).name == "transformer"
    assert config["z_image_zero_time"] == "data"  # resolved when the run started, recorded in the checkpoint
    linked = export_diffusers(full_run, tmp_path / "linked", pipeline=base, link_parts=True)
    vae_file = next((base / "vae").glob("*.safetensors"))
    assert (linked / "vae" / vae_file.name).stat().st_ino == vae_file.stat().st_ino  # hard link, no copy
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        export_diffusers(full_run, tmp_path / "nowhere", pipeline=tmp_path)


def test_bf16_export_halves_the_weights_and_stays_close(full_run, tmp_path):
    full = export_diffusers(full_run, tmp_path / "fp32")
    half = export_diffusers(full_run, tmp_path / "bf16", dtype="bf16")
    sizes = [sum(f.stat().st_size for f in (folder / "transformer").glob("*.safetensors")) for folder in (full, half)]
    assert 0.45 < sizes[1] / sizes[0] < 0.55
    weights = load_file(str(next((half / "transformer").glob("*.safetensors"))))
    trained = load_file(str(checkpoint_folder(full_run, 4) / "model.safetensors"))
    assert all(value.dtype == torch.bfloat16 for value in weights.values())
    assert all(torch.equal(value, trained[f"transformer.{key}"].to(torch.bfloat16)) for key, value in weights.items())
    with pytest.raises(ValueError, match="dtype"):
        export_diffusers(full_run, tmp_path / "fp16", dtype="fp16")


@pytest.fixture(scope="module")
def lora_run(base, cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lora") / "run"
    _run(*_train_arguments(base, cache, run, LORA, "phases.0.steps=2"))
    return run


def test_lora_export_generates_with_lora_and_merged_equals_it(lora_run, base, tmp_path):
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    _run("export", "--checkpoint", lora_run, "--out", adapter_dir)
    _run("export", "--checkpoint", lora_run, "--out", merged_dir, "--merge-lora")
    assert read_export_metadata(merged_dir / "transformer")["lora_merged"] is True
    with_lora = np.asarray(_generate(base, tmp_path / "images_lora", "--lora", adapter_dir)).astype(int)
    merged = np.asarray(_generate(merged_dir, tmp_path / "images_merged")).astype(int)
    assert np.abs(with_lora - merged).max() <= 1  # PNG rounding of nearly equal floats

    # The transformers themselves: merged weights == base + adapter, and both differ from the base.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=generator)
    condition = {"prompt_embeds": torch.randn(2, 6, 16, generator=generator)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        networks = {
            "lora": load_lora_export(base, adapter_dir), "merged": load_adapter(merged_dir),
            "base": load_adapter(base),
        }
    with torch.no_grad():
        outputs = {name: network(x, 0.8, 0.3, condition) for name, network in networks.items()}
    assert read_export_metadata(adapter_dir)["z_image_zero_time"] == "data"
    assert all(networks[name].time_convention.zero_time == "data" for name in ("lora", "merged", "base"))
    torch.testing.assert_close(outputs["merged"], outputs["lora"], atol=1e-5, rtol=1e-5)
    assert (outputs["merged"] - outputs["base"]).abs().max() > 1e-3


def test_lora_file_is_what_diffusers_pipelines_load(lora_run, base, tmp_path):
    """``pipe.load_lora_weights`` (diffusers alone, no twinflow) reads the exported LoRA: its
    transformer equals ours at r = t, where the second time embedding does not enter."""
    import diffusers

    export = export_diffusers(lora_run, tmp_path / "adapter")
    pipe = diffusers.ZImagePipeline.from_pretrained(str(base))
    pipe.load_lora_weights(str(export), weight_name="pytorch_lora_weights.safetensors")
    assert getattr(pipe.transformer, "peft_config", None)  # something was loaded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_lora_export(base, export)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=generator)
    embeds = torch.randn(2, 6, 16, generator=generator)
    time = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        # ZImagePipeline's call: reversed clock 1 - t, velocity = -output.
        theirs = pipe.transformer(list(x.unsqueeze(2).unbind(0)), 1 - time, list(embeds.unbind(0)), return_dict=False)[0]
        expected = ours(x, time, time, {"prompt_embeds": embeds})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the base has no emb_2 (it does not enter at r = t)
            untrained = load_adapter(base)(x, time, time, {"prompt_embeds": embeds})
    theirs = -torch.stack(theirs).squeeze(2)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
    assert (theirs - untrained).abs().max() > 1e-3


def test_lora_export_with_a_pipeline_is_refused(lora_run, base, tmp_path):
    with pytest.raises(ValueError, match="merge_lora"):
        export_diffusers(lora_run, tmp_path / "x", pipeline=base)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_single_embedding_export_loads_as_single_embedding(base, cache, tmp_path):
    run = tmp_path / "run"
    _run(*_train_arguments(base, cache, run, LORA, "phases.0.steps=2", "model.single_time_embedding=true"))
    merged = export_diffusers(run, tmp_path / "merged", merge_lora=True)
    assert json.loads((merged / "transformer" / METADATA_FILE).read_text())["single_time_embedding"] is True
    assert load_adapter(merged).single_time_embedding  # from twinflow.json, without being told
    _generate(merged, tmp_path / "images")
