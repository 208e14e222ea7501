"""End-to-end tests of the command line (``twinflow train | sample``) and ``twinflow.load``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import twinflow
from cli_runs import SCRIPT, SMALL, TINY, sets
from twinflow.cli import main
from twinflow.train.checkpoint import checkpoint_folder, list_checkpoints


@pytest.fixture(scope="module")
def run(single_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_run")
    code = main(["train", "--config", str(TINY), "--out", str(out), *sets(SMALL)])
    assert code == 0
    return out


def _sample(run: Path, tmp: Path, name: str, *extra: str) -> dict:
    npz = tmp / f"{name}.npz"
    code = main(["sample", "--checkpoint", str(run), "--device", "cpu", "--npz", str(npz), *extra])
    assert code == 0
    with np.load(npz) as data:
        return {key: data[key] for key in data.files}


def test_train_writes_checkpoints_and_grids(run):
    # tiny.yaml: 6 steps, checkpoint every 3, keep 2; grids for its presets 1nfe and 2nfe.
    assert list_checkpoints(run) == [checkpoint_folder(run, 3), checkpoint_folder(run, 6)]
    for preset in ("1nfe", "2nfe"):
        with Image.open(run / f"samples_{preset}.png") as grid:
            # one image per class with sampling.per_class=1: 10 rows, 1 column, 2x upscaled
            assert grid.size == (2 * (28 + 2 * 2), 2 * (10 * 30 + 2))
    assert (run / "metrics.jsonl").read_text().count("\n") == 3
    assert "limit: 64" in (run / "config.yaml").read_text()


def test_sample_1nfe_npz_and_grid(run, tmp_path, capsys):
    grid = tmp_path / "g.png"
    data = _sample(run, tmp_path, "s", "--preset", "1nfe", "--per-class", "3", "--grid", str(grid))
    assert "1 network call(s)" in capsys.readouterr().out
    images, labels = data["images"], data["labels"]
    assert images.dtype == np.float32 and images.shape == (30, 1, 28, 28)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0  # not a constant image
    assert labels.dtype == np.int64
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    with Image.open(grid) as picture:
        # 10 rows (one per class) x 3 columns of 28 px tiles, 2 px padding, upscaled by 2
        assert picture.size == (2 * (3 * 30 + 2), 2 * (10 * 30 + 2))


def test_sample_seed_controls_the_noise(run, tmp_path):
    first = _sample(run, tmp_path, "a", "--per-class", "1", "--seed", "3")
    again = _sample(run, tmp_path, "b", "--per-class", "1", "--seed", "3")
    other = _sample(run, tmp_path, "c", "--per-class", "1", "--seed", "4")
    assert np.array_equal(first["images"], again["images"])
    assert not np.array_equal(first["images"], other["images"])
    assert np.array_equal(first["labels"], other["labels"])


def test_sample_2nfe_and_labels(run, tmp_path, capsys):
    data = _sample(run, tmp_path, "two", "--preset", "2nfe", "--labels", "7,1,7")
    assert "2 network call(s)" in capsys.readouterr().out
    assert data["images"].shape == (3, 1, 28, 28)
    assert data["images"].min() >= 0.0 and data["images"].max() <= 1.0
    assert data["labels"].tolist() == [7, 1, 7]


def test_sample_from_a_checkpoint_folder(run, tmp_path):
    # an explicit (older) checkpoint folder, not the run's newest
    older = _sample(run / "checkpoints" / "step_0000003", tmp_path, "old", "--per-class", "1")
    newest = _sample(run, tmp_path, "new", "--per-class", "1")
    assert older["images"].shape == newest["images"].shape == (10, 1, 28, 28)
    assert not np.array_equal(older["images"], newest["images"])


def test_unknown_config_key_exits_2_naming_it(tmp_path, capsys):
    code = main(["train", "--config", str(TINY), "--out", str(tmp_path / "x"), "--set", "training.bogus_key=1"])
    assert code == 2
    error = capsys.readouterr().err
    assert "training.bogus_key" in error and error.startswith("error:")
    assert not (tmp_path / "x").exists()  # nothing was trained or written


def test_resume_without_a_run_errors_cleanly(single_thread, tmp_path, capsys):
    missing = tmp_path / "never_trained"
    assert main(["train", "--resume", "--out", str(missing)]) != 0
    error = capsys.readouterr().err
    assert error.startswith("error:") and "config.yaml" in error
    assert main(["train", "--resume", "--config", str(TINY), "--out", str(missing), *sets(SMALL)]) != 0
    error = capsys.readouterr().err
    assert error.startswith("error:") and "no checkpoint" in error


def test_sample_missing_checkpoint_errors_cleanly(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path), "--device", "cpu"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_python_api_load_and_sample(run):
    generator = twinflow.load(run, device="cpu")
    samples = generator.sample(per_class=2, preset="1nfe")
    assert samples.images.shape == (20, 1, 28, 28)
    assert samples.images.dtype == torch.float32
    assert samples.images.min() >= 0 and samples.images.max() <= 1
    assert samples.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert samples.network_calls == 1
    # the same call gives the same images
    assert torch.equal(generator.sample(per_class=2, preset="1nfe").images, samples.images)


def test_console_script_help():
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "sample" in result.stdout
    assert "usage: twinflow" in result.stdout


def test_training_into_an_earlier_run_without_resume_is_refused_and_changes_nothing(run, tmp_path, capsys):
    """Issue 14, item 1: a fresh run into a run folder would overwrite and prune its checkpoints
    and mix its logs; it is refused (exit 2, one line) before anything is written."""
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in run.rglob("*") if path.is_file()}
    code = main(["train", "--config", str(TINY), "--out", str(run), *sets(SMALL + ["seed=7"])])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and str(run) in error and "--resume" in error
    assert error.count("\n") == 1 and "Traceback" not in error
    after = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in run.rglob("*") if path.is_file()}
    assert after == before
    # an empty folder (made by the user beforehand) is a fresh run's folder; a file is not
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--config", str(TINY), "--out", str(empty), *sets(SMALL)]) == 0
    assert list_checkpoints(empty) == [checkpoint_folder(empty, 3), checkpoint_folder(empty, 6)]
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert main(["train", "--config", str(TINY), "--out", str(a_file), *sets(SMALL)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep me"
