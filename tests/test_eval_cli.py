"""End-to-end tests of ``twinflow eval`` on a tiny checkpoint, and of ``evaluate_checkpoint``."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from test_metrics import cached_digit_classifier
from torch import nn

from twinflow.cli import main
from twinflow.eval import evaluate_checkpoint, inception_fid_available
from twinflow.eval.classifier import SIDECAR_FILE, WEIGHTS_FILE
from twinflow.eval.evaluate import INCEPTION_WEIGHTS_FILE, REAL_DATA_ROW

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["data.limit=64", "device=cpu", "sampling.per_class=1"]


@pytest.fixture(scope="module")
def run(single_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_run")
    overrides = [item for override in SMALL for item in ("--set", override)]
    assert main(["train", "--config", str(TINY), "--out", str(out), *overrides]) == 0
    return out


@pytest.fixture(scope="module")
def classifier_path(single_thread, tmp_path_factory) -> Path:
    _, report = cached_digit_classifier(tmp_path_factory)
    return Path(report.path)


@pytest.fixture(autouse=True)
def no_inception_weights(monkeypatch, tmp_path):
    """An empty torch hub cache: the Inception weights are absent whatever this machine holds."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _eval(run: Path, classifier: Path, *extra: str) -> int:
    return main(["eval", "--checkpoint", str(run), "--presets", "1nfe,2nfe", "--num", "50",
                 "--classifier", str(classifier), "--device", "cpu", *extra])


def test_eval_writes_json_and_prints_a_markdown_table(run, classifier_path, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert _eval(run, classifier_path, "--out", str(out)) == 0
    stdout = capsys.readouterr().out
    assert "| preset | NFE | images | accuracy | Fréchet distance | precision | recall | seconds | images/s |" in stdout
    assert "| 1nfe | 1 | 50 |" in stdout and "| 2nfe | 2 | 50 |" in stdout
    assert f"| {REAL_DATA_ROW} |" in stdout
    report = json.loads(out.read_text())
    rows = report["presets"]
    assert [row["preset"] for row in rows] == ["1nfe", "2nfe"]
    assert [row["network_calls"] for row in rows] == [1, 2]
    for row in [*rows, report["real_data"]]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
        assert row["frechet_distance"] >= 0.0
    for row in rows:
        assert row["count"] == 50
        assert row["seconds"] > 0 and row["images_per_second"] == pytest.approx(50 / row["seconds"])
    # The classifier's own held-out accuracy is reported, and printed.
    assert report["classifier_test_accuracy"] >= 0.95
    assert f"{report['classifier_test_accuracy']:.2%}" in stdout
    # data.limit=64 with the 80/20 split: 51 reference and 13 held-out images
    assert (report["reference_count"], report["held_out_count"]) == (51, 13)
    assert report["real_data"]["count"] == 13
    assert report["inception_message"] is None


def test_eval_takes_sampler_specs(run, classifier_path, capsys):
    assert main(["eval", "--checkpoint", str(run), "--presets", "multi:steps=3,4nfe:gaps=[0.001,0.4]", "--num", "20",
                 "--classifier", str(classifier_path), "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "| multi:steps=3 | 3 | 20 |" in stdout and "| 4nfe:gaps=[0.001,0.4] | 4 | 20 |" in stdout
    with pytest.raises(ValueError, match="unknown sampler preset 'fast'"):
        evaluate_checkpoint(run, presets=["fast"], num=20, classifier=classifier_path, device="cpu")


def test_real_held_out_digits_beat_an_untrained_generator(run, classifier_path):
    # six training steps make noise-like blobs: the real row must score far better
    report = evaluate_checkpoint(run, presets=["1nfe"], num=50, classifier=classifier_path, device="cpu")
    real, generated = report.real_data, report.presets[0]
    assert real.accuracy > 0.9 > generated.accuracy
    assert real.frechet_distance < generated.frechet_distance
    # the classifier saw all 5,000 digits' split, the checkpoint only 64: the report says so
    assert any("the classifier was trained on data" in note for note in report.notes)


def test_eval_is_seeded(run, classifier_path):
    first = evaluate_checkpoint(run, presets=["1nfe"], num=20, classifier=classifier_path, device="cpu", seed=1)
    again = evaluate_checkpoint(run, presets=["1nfe"], num=20, classifier=classifier_path, device="cpu", seed=1)
    other = evaluate_checkpoint(run, presets=["1nfe"], num=20, classifier=classifier_path, device="cpu", seed=2)
    assert first.presets[0].frechet_distance == again.presets[0].frechet_distance
    assert first.presets[0].frechet_distance != other.presets[0].frechet_distance


def test_missing_classifier_exits_2_naming_the_file(run, classifier_path, tmp_path, capsys):
    missing = tmp_path / "no_such_classifier"
    assert _eval(run, missing) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and str(missing) in error
    # a folder with weights but no sidecar: the sidecar is named
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes((classifier_path / WEIGHTS_FILE).read_bytes())
    assert _eval(run, folder) == 2
    assert str(folder / SIDECAR_FILE) in capsys.readouterr().err


def test_unknown_preset_and_too_small_num_exit_2(run, classifier_path, capsys):
    assert main(["eval", "--checkpoint", str(run), "--presets", "1nfe,9nfe", "--classifier", str(classifier_path)]) == 2
    assert "9nfe" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--num", "2", "--classifier", str(classifier_path)]) == 2
    assert "--num" in capsys.readouterr().err


def test_inception_without_libraries_or_weights_prints_what_is_missing(run, classifier_path, tmp_path, capsys):
    available, message = inception_fid_available()
    assert not available  # TORCH_HOME points at an empty folder: the weights are absent
    assert INCEPTION_WEIGHTS_FILE in message and str(tmp_path / "torch_home") in message
    assert _eval(run, classifier_path, "--presets", "1nfe", "--inception") == 0
    stdout = capsys.readouterr().out
    assert "Inception FID: not computed" in stdout and INCEPTION_WEIGHTS_FILE in stdout
    if "torch_fidelity" not in sys.modules:
        assert "pip install torch-fidelity" in stdout


class _FakeInception(nn.Module):
    """Stands in for torch-fidelity's Inception: 4x4 average-pooled pixels as "features"."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        assert Path(feature_extractor_weights_path).is_file()
        self.features_list = features_list

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        return (nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1),)


def test_inception_fid_is_computed_when_library_and_weights_are_present(run, classifier_path, tmp_path, monkeypatch):
    package = types.ModuleType("torch_fidelity")
    package.__spec__ = importlib.machinery.ModuleSpec("torch_fidelity", None)
    extractor_module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    extractor_module.FeatureExtractorInceptionV3 = _FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", extractor_module)
    weights = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"stand-in")
    assert inception_fid_available()[0]
    report = evaluate_checkpoint(run, presets=["1nfe"], num=20, classifier=classifier_path, device="cpu", inception=True)
    generated, real = report.presets[0].inception_frechet_distance, report.real_data.inception_frechet_distance
    assert generated is not None and real is not None and generated > real >= 0
    assert "Inception FD" in report.to_markdown()
