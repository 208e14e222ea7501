"""TwinFlow's second time embedding as a separate "patch" file on a plain base pipeline (issue 17).

Users' files carry the released names bare (``time_text_embed_2.*``, ``t_embedder_2.*``,
``time_embed_2.*``) or under a wrapper (``transformer.``, ``extended_weights.``). Every accepted
layout, for every family, must give the adapter the released folder gives; wrong keys are listed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from twinflow.adapters import ADAPTERS, load_adapter  # noqa: E402
from twinflow.adapters.weights import WRAPPER_PREFIXES, extra_state_dict  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.testing import build_tiny_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = sorted(ADAPTERS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra")
    made = {}
    for family in FAMILIES:
        encoder = family != "flux"  # the tiny Flux folder has no text encoders
        made[family] = build_tiny_folder(root / family, family, text_encoder=encoder)
        made[family, "released"] = build_tiny_folder(root / f"{family}_released", family, text_encoder=encoder, extra_weights=True)
    return made


def _quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_adapter(*args, **kwargs)


@pytest.mark.parametrize("wrapper", ["", *WRAPPER_PREFIXES])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_accepted_key_layout_loads_as_the_released_folder(family, wrapper, folders, tmp_path):
    released = _quiet_load(folders[family, "released"])
    weights = extra_state_dict(released)
    patch = tmp_path / "patch.safetensors"
    save_file({f"{wrapper}{name}": value.contiguous() for name, value in weights.items()}, str(patch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "initialised as a copy" warning: the patch is the second embedding
        patched = load_adapter(folders[family], extra_weights=patch)
    assert patched.time_convention == released.time_convention
    got = extra_state_dict(patched)
    assert got.keys() == weights.keys() and all(torch.equal(got[name], value) for name, value in weights.items())
    assert all(torch.equal(a, b) for a, b in zip(patched.state_dict().values(), released.state_dict().values()))


def test_wrong_keys_are_listed(folders, tmp_path):
    weights = extra_state_dict(_quiet_load(folders["qwen_image", "released"]))
    first, *rest = sorted(weights)
    patch = tmp_path / "partial.safetensors"
    save_file({**{name: weights[name].contiguous() for name in rest}, "t_embedder_2.weight": torch.zeros(2)}, str(patch))
    with pytest.raises(ValueError, match=rf"missing {first}; unexpected t_embedder_2.weight"):
        load_adapter(folders["qwen_image"], extra_weights=patch)


@pytest.mark.parametrize("family, wrapper", [("qwen_image", "transformer."), ("z_image", "extended_weights.")])
def test_generate_with_a_patch_file_equals_the_released_folder(family, wrapper, folders, tmp_path):
    weights = extra_state_dict(_quiet_load(folders[family, "released"]))
    patch = tmp_path / "patch.safetensors"
    save_file({f"{wrapper}{name}": value.contiguous() for name, value in weights.items()}, str(patch))
    common = ("--prompt", "a red fox", "--size", "16x16", "--preset", "2nfe", "--seed", 4, "--device", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(item) for item in ("generate", "--model", folders[family], "--extra-weights", patch, *common,
                                            "--out", tmp_path / "patched")]) == 0
        assert main([str(item) for item in ("generate", "--model", folders[family, "released"], *common,
                                            "--out", tmp_path / "released")]) == 0
    patched, released = (np.asarray(Image.open(tmp_path / name / "0_4.png")) for name in ("patched", "released"))
    assert np.array_equal(patched, released)


def _train(base, cache, run, *overrides):
    from tiny_text_to_image import TINY

    sets = [f"model.path={base / 'transformer'}", f"data.root={cache}", "training.learning_rate=1e-2", "phases.0.steps=2",
            *overrides]
    assert _cli("train", "--config", TINY, "--out", run, *[item for value in sets for item in ("--set", value)]) == 0


def _cli(*arguments) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([str(argument) for argument in arguments])


def test_the_comfyui_export_round_trips_through_extra_weights(folders, tmp_path, capsys):
    """``export --format comfyui``: the patch holds the checkpoint's emb_2 under the names ComfyUI's
    patcher reads, the LoRA file is diffusers' format; both load back (``--extra-weights``, ``--lora
    FILE``) to the images of the diffusers-format export."""
    from safetensors import safe_open
    from tiny_text_to_image import LORA, write_captioned_images

    from twinflow.train.export import comfyui_files

    images = write_captioned_images(tmp_path / "images", 4, (16, 16))
    common = ("--prompt", "a red fox", "--size", "16x16", "--preset", "2nfe", "--seed", 4, "--device", "cpu")
    for family, overrides in (("qwen_image", (LORA,)), ("z_image", ())):  # a LoRA run, a full-parameter run
        base, cache, run = folders[family], tmp_path / f"cache_{family}", tmp_path / f"run_{family}"
        assert _cli("cache", "--model", base, "--data", images, "--size", 16, "--out", cache, "--device", "cpu") == 0
        _train(base, cache, run, *overrides)
        comfy, reference = tmp_path / f"comfy_{family}", tmp_path / f"diffusers_{family}"
        capsys.readouterr()
        assert _cli("export", "--checkpoint", run, "--out", comfy, "--format", "comfyui", "--ema", "--dtype", "bf16") == 0
        printed = capsys.readouterr().out
        assert _cli("export", "--checkpoint", run, "--out", reference, "--ema") == 0
        patch, lora = comfyui_files(comfy, family)
        prefix = "time_text_embed_2." if family == "qwen_image" else "t_embedder_2."
        with safe_open(str(patch), framework="pt") as handle:
            assert handle.keys() and all(key.startswith(prefix) for key in handle.keys())
            assert {str(handle.get_tensor(key).dtype) for key in handle.keys()} == {"torch.bfloat16"}
        assert lora.is_file() == (family == "qwen_image")
        if family == "qwen_image":
            with safe_open(str(lora), framework="pt") as handle:
                assert all(key.startswith("transformer.") and ".lora_" in key for key in handle.keys())
            ours = ("--model", base, "--lora", lora, "--extra-weights", patch)
            theirs = ("--model", base, "--lora", reference)
        else:
            assert "reads r = 0 as the data end" in printed  # trained here: the "data" reading, recorded
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert load_adapter(base, extra_weights=patch).time_convention.zero_time == "data"
            ours = ("--model", reference, "--extra-weights", patch)  # the trained transformer, its emb_2 from the patch
            theirs = ("--model", reference)
        for name, model in (("ours", ours), ("theirs", theirs)):
            assert _cli("generate", *model, *common, "--out", tmp_path / f"{family}_{name}") == 0
        got, expected = (np.asarray(Image.open(tmp_path / f"{family}_{name}" / "0_4.png"), dtype=np.int16) for name in ("ours", "theirs"))
        assert np.abs(got - expected).max() <= 2, family  # the patch in bf16: within rounding of the fp32 export
    assert _cli("export", "--checkpoint", run, "--out", tmp_path / "x", "--format", "comfyui", "--merge-lora") == 2
    assert not (tmp_path / "x").exists()
