"""The released checkpoints' hub layouts, read from an offline hub cache (issue 17).

The official TwinFlow checkpoints are pipelines in sub-folders of their repositories
(``inclusionAI/TwinFlow``: ``TwinFlow-Qwen-Image-v1.0/TwinFlow-Qwen-Image/``;
``inclusionAI/TwinFlow-Z-Image-Turbo``: ``TwinFlow-Z-Image-Turbo-exp/``, no ``model_index.json``
at the root). Here tiny random pipelines sit in a local hub cache laid out as huggingface_hub
writes it (``models--owner--name/snapshots/<commit>/...`` and ``refs/main``), and
``HF_HUB_OFFLINE=1`` makes every lookup local: nothing is downloaded.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("huggingface_hub")

from twinflow.cli import main  # noqa: E402
from twinflow.generation import TextToImage  # noqa: E402
from twinflow.generation.loading import resolve_model_folder, split_hub_id  # noqa: E402
from twinflow.testing import build_tiny_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
QWEN = "inclusionAI/TwinFlow/TwinFlow-Qwen-Image-v1.0/TwinFlow-Qwen-Image"
Z_IMAGE = "inclusionAI/TwinFlow-Z-Image-Turbo/TwinFlow-Z-Image-Turbo-exp"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache holding both released layouts (tiny random pipelines with extra weights)."""
    root = tmp_path_factory.mktemp("hub")
    cache, folders = root / "cache", {}
    for hub_id, family in ((QWEN, "qwen_image"), (Z_IMAGE, "z_image")):
        repository, inside = split_hub_id(hub_id)
        storage = cache / ("models--" + repository.replace("/", "--"))
        folders[hub_id] = build_tiny_folder(root / family, family, extra_weights=True)
        shutil.copytree(folders[hub_id], storage / "snapshots" / COMMIT / inside)
        (storage / "snapshots" / COMMIT / "README.md").write_text("model card")
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text(COMMIT)
    return cache, folders


@pytest.fixture
def offline(hub, monkeypatch):
    cache, folders = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return folders


def _run(*arguments) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([str(argument) for argument in arguments])


def test_split_hub_id():
    assert split_hub_id(QWEN) == ("inclusionAI/TwinFlow", "TwinFlow-Qwen-Image-v1.0/TwinFlow-Qwen-Image")
    assert split_hub_id("owner/name") == ("owner/name", "")


def test_a_sub_folder_hub_id_resolves_offline_and_generates_as_the_folder(offline):
    folder = resolve_model_folder(QWEN)
    assert folder.parts[-2:] == ("TwinFlow-Qwen-Image-v1.0", "TwinFlow-Qwen-Image") and COMMIT in folder.parts
    images = []
    for model in (QWEN, offline[QWEN]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the extra weights are found in the hub copy too: no copy warning
            pipe = TextToImage.from_pretrained(model, device="cpu")
        result = pipe.generate(["a red fox"], preset="1nfe", width=16, height=16, seed=2, progress=False)
        images.append(np.asarray(result.images[0]))
    assert np.array_equal(images[0], images[1])


def test_the_command_line_takes_the_z_image_turbo_layout(offline, tmp_path, capsys):
    assert _run("generate", "--model", Z_IMAGE, "--prompt", "a red fox", "--size", "16x16", "--preset", "2nfe",
                "--device", "cpu", "--out", tmp_path / "hub") == 0
    assert _run("generate", "--model", offline[Z_IMAGE], "--prompt", "a red fox", "--size", "16x16", "--preset", "2nfe",
                "--device", "cpu", "--out", tmp_path / "folder") == 0
    hub_image, folder_image = (np.asarray(Image.open(tmp_path / name / "0_0.png")) for name in ("hub", "folder"))
    assert np.array_equal(hub_image, folder_image)
    # The repository's root is no pipeline: the error names the one inside it.
    assert _run("generate", "--model", "inclusionAI/TwinFlow-Z-Image-Turbo", "--prompt", "x", "--device", "cpu",
                "--out", tmp_path / "root") == 2
    assert "pipelines inside it: ['TwinFlow-Z-Image-Turbo-exp']" in capsys.readouterr().err


def test_a_missing_repository_or_sub_folder_is_named(offline, tmp_path, capsys):
    assert _run("generate", "--model", "inclusionAI/Nothing/here", "--prompt", "x", "--device", "cpu",
                "--out", tmp_path / "a") == 2
    error = capsys.readouterr().err
    assert "repository 'inclusionAI/Nothing' was not found in the local hub cache" in error and len(error.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="'inclusionAI/TwinFlow' has no sub-folder 'TwinFlow-Qwen-Image-v2.0'.*TwinFlow-Qwen-Image-v1.0"):
        resolve_model_folder("inclusionAI/TwinFlow/TwinFlow-Qwen-Image-v2.0")
