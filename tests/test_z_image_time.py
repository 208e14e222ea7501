"""Where the target time r = 0 lands on Z-Image's reversed clock (spec section 5, issue 12).

The released TwinFlow-Z-Image checkpoints read ``r' = sign(r) * (1 - |r|)`` with
``torch.sign(0) = 0``: ``r = 0`` lands on the noise end, which makes ``F`` jump at ``r = 0``.
Models trained here read ``r = 0`` as the data end (``zero_time="data"``), continuous in ``r``.
These tests check both conventions, that released checkpoints are read bitwise as the reference
code reads them, and that the convention travels with the weights (folder, config, export).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

diffusers = pytest.importorskip("diffusers")

from twinflow.adapters import METADATA_FILE, TimeConvention, ZImageAdapter, load_adapter  # noqa: E402
from twinflow.testing import build_tiny_folder, initialised  # noqa: E402
from twinflow.models import build_model  # noqa: E402
from twinflow.train.backbone import model_from_architecture  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _quiet(function, *arguments, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 copy-initialised from a base folder
        return function(*arguments, **options)


def _trained_adapter(zero_time: str):
    """A tiny random Z-Image adapter whose t_embedder_2 is perturbed away from a copy of t_embedder."""
    torch.manual_seed(0)
    transformer = initialised(diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32],
    ))
    adapter = _quiet(ZImageAdapter, transformer, zero_time=zero_time)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in adapter.second_embedding.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return adapter.eval()


def _inputs(batch: int = 4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    return x, {"prompt_embeds": torch.randn(batch, 5, 16, generator=generator)}


# -- the two conventions ---------------------------------------------------------------------


def test_conventions_agree_for_every_nonzero_time():
    generator = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=generator) * 2 - 1  # both trajectories, never exactly 0
    r = t * torch.rand(64, generator=generator)
    assert bool((t != 0).all() and (r != 0).all())
    reference, data = TimeConvention(reversed=True), TimeConvention(reversed=True, zero_time="data")
    assert torch.equal(reference.model_time(t), data.model_time(t))
    assert torch.equal(reference.second_embedding_input(t, r), data.second_embedding_input(t, r))
    assert torch.equal(reference.second_embedding_weight(t, r), data.second_embedding_weight(t, r))

    x, condition = _inputs()
    times, targets = torch.tensor([0.9, 0.6, -0.7, 1.0]), torch.tensor([0.3, 0.6, -0.2, 1e-3])
    outputs = {}
    for zero_time in ("reference", "data"):
        with torch.no_grad():
            outputs[zero_time] = _trained_adapter(zero_time)(x, times, targets, condition)
    assert torch.equal(outputs["reference"], outputs["data"])


def test_data_convention_is_continuous_at_the_one_step_target():
    """F(x, 0.6, r) -> F(x, 0.6, 0) as r -> 0 with zero_time="data"; the reference jumps."""
    x, condition = _inputs()
    gaps = {}
    for zero_time in ("reference", "data"):
        adapter = _trained_adapter(zero_time)
        with torch.no_grad():
            at_zero = adapter(x, 0.6, 0.0, condition)
            near_zero = adapter(x, 0.6, 1e-7, condition)
        gaps[zero_time] = ((near_zero - at_zero).abs().max() / at_zero.abs().max()).item()
    # (The sinusoids of 1000 (t - r) make F steep in r: about 3e3 per unit r relative here,
    # so the limit is checked at r = 1e-7.)
    assert gaps["data"] < 1e-3
    assert gaps["reference"] > 0.1


def test_one_step_target_reaches_the_model_only_with_the_data_convention():
    x, condition = _inputs()
    for zero_time in ("reference", "data"):
        adapter = _trained_adapter(zero_time)
        with torch.no_grad():
            one_step, instantaneous = adapter(x, 1.0, 0.0, condition), adapter(x, 1.0, 1.0, condition)
        if zero_time == "reference":  # r' = 0 = t': no target-time signal at all
            assert torch.equal(one_step, instantaneous)
        else:
            assert (one_step - instantaneous).abs().max() > 0.1 * instantaneous.abs().max()


# -- folders: the convention follows the weights ---------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {
        "base": build_tiny_folder(root / "base", "z_image", text_encoder=False),
        "released": build_tiny_folder(root / "released", "z_image", text_encoder=False, extra_weights=True),
        "sd3": build_tiny_folder(root / "sd3", "sd3", text_encoder=False),
    }


def _clock(time: torch.Tensor) -> torch.Tensor:
    return torch.sign(time) * (1 - time.abs())  # the reference: torch.sign(0) = 0


def test_released_checkpoint_is_read_bitwise_as_the_reference_code(folders):
    """A released folder (t_embedder_2 in transformer/, no twinflow.json) against the reference
    formula written out on the unmodified diffusers transformer: t' = sign(t) (1 - |t|),
    t_emb = t_embedder(1000 t') + t_embedder_2(1000 (r' - t')) |t' - r'|, output negated."""
    folder = folders["released"] / "transformer"
    adapter = load_adapter(folder).eval()
    assert adapter.time_convention.zero_time == "reference"

    plain = diffusers.ZImageTransformer2DModel.from_pretrained(str(folder)).eval()  # ignores t_embedder_2.*
    weights = {}
    for file in folder.glob("*.safetensors"):
        weights |= {key: value for key, value in load_file(str(file)).items() if key.startswith("t_embedder_2.")}
    assert weights
    second = copy.deepcopy(plain.t_embedder)
    second.load_state_dict({key[len("t_embedder_2."):]: value for key, value in weights.items()})
    scale = float(plain.config.t_scale)

    t = torch.tensor([0.6, 1.0, 0.9, 0.35])
    r = torch.tensor([0.0, 0.0, 0.5, 0.1])  # the one-step target and ordinary ones

    def add_target_time(module, args, embedding):
        second_input = ((_clock(r.double()) - _clock(t.double())) * scale).float()
        weight = (_clock(t) - _clock(r)).abs()
        return (embedding.float() + second(second_input).float() * weight[:, None]).to(embedding.dtype)

    plain.t_embedder.register_forward_hook(add_target_time)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    embeds = torch.randn(4, 6, 16, generator=generator)
    with torch.no_grad():
        outputs = plain(list(x.unsqueeze(2).unbind(0)), _clock(t), list(embeds.unbind(0)), return_dict=False)[0]
        expected = -torch.stack(outputs).squeeze(2)
        got = adapter(x, t, r, {"prompt_embeds": embeds})
    assert torch.equal(got, expected)


def test_auto_follows_the_folder_and_an_argument_overrides_it(folders, tmp_path):
    assert _quiet(load_adapter, folders["base"]).time_convention.zero_time == "data"  # a new model
    assert load_adapter(folders["released"]).time_convention.zero_time == "reference"
    assert load_adapter(folders["released"], z_image_zero_time="data").time_convention.zero_time == "data"

    # twinflow.json beside the transformer (an export of this project) decides under auto.
    export = tmp_path / "export"
    (export / "transformer").mkdir(parents=True)
    for file in (folders["released"] / "transformer").iterdir():
        (export / "transformer" / file.name).write_bytes(file.read_bytes())
    metadata = export / "transformer" / METADATA_FILE
    metadata.write_text(json.dumps({"family": "z_image", "z_image_zero_time": "data"}))
    assert load_adapter(export).time_convention.zero_time == "data"
    assert load_adapter(export, z_image_zero_time="reference").time_convention.zero_time == "reference"
    metadata.write_text(json.dumps({"family": "z_image", "step": 4}))  # an export from before the choice
    assert load_adapter(export).time_convention.zero_time == "reference"

    with pytest.raises(ValueError, match="Z-Image only"):
        load_adapter(folders["sd3"], z_image_zero_time="data")


def test_model_config_records_the_resolved_convention(folders):
    base = folders["base"] / "transformer"
    built = {
        "base": _quiet(build_model, "diffusers", path=str(base)),
        "released": build_model("diffusers", path=str(folders["released"])),
        "override": build_model("diffusers", path=str(folders["released"]), z_image_zero_time="data"),
    }
    for name, expected in (("base", "data"), ("released", "reference"), ("override", "data")):
        assert built[name].time_convention.zero_time == expected, name
        assert built[name].config.to_dict()["z_image_zero_time"] == expected, name  # what `architecture` stores

    # The architecture record rebuilds the recorded convention, not the folder's auto one.
    architecture = {"name": "diffusers", "config": built["base"].config.to_dict(), "family": "z_image"}
    assert model_from_architecture(architecture).time_convention.zero_time == "data"
    architecture["config"]["z_image_zero_time"] = "reference"
    assert model_from_architecture(architecture).time_convention.zero_time == "reference"
    del architecture["config"]["z_image_zero_time"]  # a checkpoint from before the choice
    assert model_from_architecture(architecture).time_convention.zero_time == "reference"

    with pytest.raises(ValueError, match="model.z_image_zero_time must be"):
        build_model("diffusers", path=str(base), z_image_zero_time="noise")
    with pytest.raises(ValueError, match="model.z_image_zero_time applies to Z-Image"):
        build_model("diffusers", path=str(folders["sd3"]), z_image_zero_time="reference")
    sd3 = _quiet(build_model, "diffusers", path=str(folders["sd3"]))
    assert sd3.config.z_image_zero_time == "auto" and not sd3.time_convention.reversed
