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
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from twinflow.adapters import ADAPTERS, load_adapter  # noqa: E402
from twinflow.adapters.weights import WRAPPER_PREFIXES, extra_state_dict  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.generation import TextToImage  # noqa: E402
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
    from PIL import Image

    patched, released = (np.asarray(Image.open(tmp_path / name / "0_4.png")) for name in ("patched", "released"))
    assert np.array_equal(patched, released)
    with pytest.raises(ValueError, match="give lora or extra_weights, not both"):
        TextToImage.from_pretrained(folders[family], extra_weights=patch, lora=tmp_path, device="cpu")
