"""Reliability probes (issue 14): bad input and faults as a new user meets them, through the CLI.

Every probe asserts what the user sees and what is left on disk:

* an expected failure exits with code 2 and prints one line, ``error: ...``, naming the flag,
  config key or file, never a traceback;
* where data could be lost, the files of the run are byte for byte what they were;
* a bug (anything unexpected) prints a one-line summary before its traceback and exits 1.

The probes run ``twinflow.cli.main`` in this process (one import of torch for them all); one
runs the installed console script and one kills a training process with SIGKILL. The fixtures
are seconds-long: the tiny MNIST run of ``configs/tiny.yaml``, a tiny Z-Image training run on a
random latent cache, and a tiny random Z-Image pipeline folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cli_runs import SCRIPT, SMALL, TINY, sets
from twinflow.cli import main
from twinflow.train.checkpoint import checkpoint_folder, list_checkpoints

pytest.importorskip("diffusers")

from tiny_text_to_image import TINY as TINY_TEXT_TO_IMAGE  # noqa: E402
from tiny_text_to_image import save_tiny_transformer, write_tiny_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")



def run_cli(capsys, *argv) -> tuple[int, str]:
    """``main(argv)``'s exit code (argparse's too) and what it printed on stderr."""
    capsys.readouterr()
    try:
        code = main([str(item) for item in argv])
    except SystemExit as stop:  # argparse
        code = stop.code
    return code, capsys.readouterr().err


def assert_named_error(code: int, error: str, *named: str) -> None:
    """Exit code 2, one ``error:`` line naming every string in ``named``, no traceback."""
    lines = [line for line in error.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}: {error}"
    assert "Traceback" not in error, error
    assert len(lines) == 1 and lines[0].startswith("error: "), error
    for name in named:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reliability") / "run"
    assert main(["train", "--config", str(TINY), "--out", str(run), *sets(SMALL)]) == 0
    return run


@pytest.fixture(scope="module")
def text_to_image(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_to_image")
    transformer = save_tiny_transformer(root / "z_image" / "transformer")
    cache = write_tiny_cache(root / "cache")
    run = root / "run"
    overrides = [f"model.path={transformer}", f"data.root={cache}", "phases.0.steps=2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 copy-initialised
        assert main(["train", "--config", str(TINY_TEXT_TO_IMAGE), "--out", str(run), *sets(overrides)]) == 0
    return {"transformer": transformer, "cache": cache, "run": run}


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    from twinflow.testing import build_tiny_folder

    return build_tiny_folder(tmp_path_factory.mktemp("pipeline") / "z_image", "z_image", extra_weights=True)


def truncated_copy(source: Path, destination: Path, weights: str) -> Path:
    """A copy of ``source`` whose ``weights`` file lost its second half (a broken download)."""
    shutil.copytree(source, destination)
    path = destination / weights
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return destination


# ---- data loss and silent wrong results (items 1-4) ---------------------------------------------


def test_a_fresh_run_into_an_earlier_run_is_refused_and_changes_nothing(mnist_run, capsys):
    before = snapshot(mnist_run)
    code, error = run_cli(capsys, "train", "--config", TINY, "--out", mnist_run, *sets(SMALL + ["seed=7"]))
    assert_named_error(code, error, str(mnist_run), "--resume")
    assert snapshot(mnist_run) == before


@pytest.mark.parametrize("override, named", [
    ("seed=7", ["seed: 0 -> 7", "--allow-change seed"]),
    ("training.batch_size=4", ["training.batch_size: 8 -> 4", "--allow-change training.batch_size"]),
    ("phases.1.objective.preset=rcgm", ["phases.1.objective.preset: 'twinflow' -> 'rcgm'"]),
    ("model.channels=[8,16]", ["architecture", "model.channels: [16, 32] -> [8, 16]"]),
    ("data.channels=3", ["architecture", "data.channels: 1 -> 3"]),
])
def test_resume_with_another_config_is_refused_naming_the_keys(mnist_run, capsys, override, named):
    """Item 2: compared with the checkpoint's config before any model is built; the architecture
    can never change, the rest only when allowed."""
    before = snapshot(mnist_run)
    code, error = run_cli(capsys, "train", "--resume", "--config", TINY, "--out", mnist_run, *sets(SMALL + [override]))
    assert_named_error(code, error, "--resume", *named)
    assert snapshot(mnist_run) == before


def test_an_architecture_change_is_refused_even_when_allowed(mnist_run, capsys):
    before = snapshot(mnist_run)
    code, error = run_cli(capsys, "train", "--resume", "--out", mnist_run, "--set", "model.embedding_dim=32",
                          "--allow-change", "model")
    assert_named_error(code, error, "architecture", "model.embedding_dim: 64 -> 32")
    assert snapshot(mnist_run) == before


def test_an_allowed_change_is_logged_and_becomes_the_run_config(mnist_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(mnist_run, run)
    shutil.rmtree(checkpoint_folder(run, 6))  # continue from step 3
    code, _ = run_cli(capsys, "train", "--resume", "--out", run, "--set", "training.learning_rate=5e-4",
                      "--allow-change", "training.learning_rate")
    assert code == 0
    logged = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert logged == [{"step": 3, "changes": {"training.learning_rate": {"from": 0.001, "to": 0.0005}}}]
    assert json.loads((checkpoint_folder(run, 6) / "state.json").read_text())["config"]["training"]["learning_rate"] == 5e-4
    # The run's config is now the changed one: a plain resume goes ahead, the old value is a change.
    assert run_cli(capsys, "train", "--resume", "--out", run)[0] == 0
    code, error = run_cli(capsys, "train", "--resume", "--out", run, "--set", "training.learning_rate=1e-3")
    assert_named_error(code, error, "training.learning_rate: 0.0005 -> 0.001")
    # --device only says where the run goes: free, and printed
    code, _ = run_cli(capsys, "train", "--resume", "--out", run, "--device", "cpu")
    assert code == 0


def test_a_lora_file_without_lora_weights_is_named(pipeline_folder, tmp_path, capsys):
    from twinflow.adapters import LORA_WEIGHTS_FILE

    lora = tmp_path / "lora"
    lora.mkdir()
    save_file({"proj_out.weight": torch.zeros(2, 2)}, str(lora / LORA_WEIGHTS_FILE))
    code, error = run_cli(capsys, "generate", "--model", pipeline_folder, "--prompt", "a fox", "--size", "16x16",
                          "--device", "cpu", "--lora", lora, "--out", tmp_path / "images")
    assert_named_error(code, error, str(lora / LORA_WEIGHTS_FILE), "holds no LoRA weights")
    assert not (tmp_path / "images").exists()


def test_divergence_names_the_step_the_checkpoint_and_what_to_change(tmp_path, capsys):
    """Item 4 through the CLI: a learning rate of 1e12 makes the loss infinite within the run."""
    run = tmp_path / "run"
    code, error = run_cli(capsys, "train", "--config", TINY, "--out", run,
                          *sets(SMALL + ["training.learning_rate=1e12", "training.grad_clip=0"]))
    assert_named_error(code, error, "training diverged", "training.learning_rate=1e+11")
    assert ("no checkpoint was saved yet" in error) or (str(list_checkpoints(run)[-1]) in error)


# ---- untrusted files (items 5 and 6: tests/test_distributed.py, tests/test_adapters.py) -----------


def test_a_training_transformer_folder_of_pickled_weights_is_refused(text_to_image, tmp_path, capsys):
    pickled = tmp_path / "transformer"
    shutil.copytree(text_to_image["transformer"], pickled)
    weights = load_file(str(pickled / "diffusion_pytorch_model.safetensors"))
    (pickled / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, pickled / "diffusion_pytorch_model.bin")
    overrides = [f"model.path={pickled}", f"data.root={text_to_image['cache']}"]
    code, error = run_cli(capsys, "train", "--config", TINY_TEXT_TO_IMAGE, "--out", tmp_path / "run", *sets(overrides))
    assert_named_error(code, error, str(pickled), "safetensors")


# ---- tracebacks where a named error belongs (items 7 and 8) --------------------------------------


def test_sampling_a_text_to_image_checkpoint_points_to_export_and_generate(text_to_image, capsys, monkeypatch):
    import twinflow.train.checkpoint as checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("the transformer weights were read")

    monkeypatch.setattr(checkpoint, "load_checkpoint", no_weights)  # the architecture is checked first
    code, error = run_cli(capsys, "sample", "--checkpoint", text_to_image["run"], "--device", "cpu")
    assert_named_error(code, error, "text-to-image checkpoint", "twinflow export", "twinflow generate")
    import twinflow

    with pytest.raises(ValueError, match="text-to-image checkpoint"):
        twinflow.load(text_to_image["run"], device="cpu")


@pytest.mark.parametrize("extra, named", [
    (["--sampler", "bogus=1"], ["unknown sampler option 'bogus'"]),
    (["--sampler", "steps"], ["--sampler 'steps' must look like key=value"]),
    (["--preset", "9nfe"], ["unknown sampler preset '9nfe'"]),
    (["--per-class", "-3"], ["--per-class", "'-3'"]),
    (["--batch-size", "0"], ["--batch-size", "'0'"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
    (["--labels", "3,x"], ["--labels", "'3,x'"]),
    (["--labels", "3,10"], ["labels must lie in [0, 9]"]),
])
def test_bad_sample_flags_are_named(mnist_run, capsys, extra, named):
    code, error = run_cli(capsys, "sample", "--checkpoint", mnist_run, "--device", "cpu", *extra)
    assert_named_error(code, error, *named)


@pytest.mark.parametrize("override, named", [
    ("training.checkpoint_every=abc", "training.checkpoint_every"),
    ("training.warmup_steps=abc", "training.warmup_steps"),
    ("training.checkpoint_every=-1", "training.checkpoint_every"),
    ("seed=abc", "seed"),
    ("model.channels=abc", "model.channels"),
    ("device=tpu", "device"),
    ("sampling.presets=[1nfe,1nfee]", "sampling.presets"),
    ("phases.1.objective.consistency_ratio=2", "consistency_ratio"),
    ("phases.1.objective.residual_clamp=0", "residual_clamp"),
])
def test_config_errors_are_named_at_load_time_and_nothing_is_written(tmp_path, capsys, override, named):
    """Items 8 and 9: raised by load_config, before the model is built or the run folder made."""
    run = tmp_path / "run"
    code, error = run_cli(capsys, "train", "--config", TINY, "--out", run, *sets(SMALL + [override]))
    assert_named_error(code, error, named)
    assert not run.exists()


def test_a_checkpoint_step_that_is_no_number_names_the_file(mnist_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(mnist_run, run)
    state_file = checkpoint_folder(run, 6) / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": "six"}))
    for argv in (("sample", "--checkpoint", run, "--device", "cpu"), ("train", "--resume", "--out", run)):
        code, error = run_cli(capsys, *argv)
        assert_named_error(code, error, str(state_file), "'step'", "'six'")


def test_truncated_weights_are_named(mnist_run, text_to_image, pipeline_folder, tmp_path, capsys):
    """A broken download or copy: checkpoint weights, a pipeline's transformer, ``model.path``."""
    run = truncated_copy(mnist_run, tmp_path / "run", "checkpoints/step_0000006/model.safetensors")
    code, error = run_cli(capsys, "sample", "--checkpoint", run, "--device", "cpu")
    assert_named_error(code, error, str(run / "checkpoints/step_0000006/model.safetensors"))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    folder = truncated_copy(pipeline_folder, tmp_path / "pipeline", weights)
    code, error = run_cli(capsys, "generate", "--model", folder, "--prompt", "a fox", "--size", "16x16",
                          "--device", "cpu", "--out", tmp_path / "images")
    assert_named_error(code, error, str(folder / weights))
    transformer = truncated_copy(text_to_image["transformer"], tmp_path / "transformer", "diffusion_pytorch_model.safetensors")
    overrides = [f"model.path={transformer}", f"data.root={text_to_image['cache']}"]
    code, error = run_cli(capsys, "train", "--config", TINY_TEXT_TO_IMAGE, "--out", tmp_path / "t2i", *sets(overrides))
    assert_named_error(code, error, str(transformer / "diffusion_pytorch_model.safetensors"))


@pytest.fixture
def no_pipeline_loading(monkeypatch):
    """Fails the probe if ``generate`` loads the pipeline before naming the bad input."""
    from twinflow.generation import TextToImage

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the input was checked")

    monkeypatch.setattr(TextToImage, "from_pretrained", refuse)


@pytest.mark.parametrize("extra, named", [
    (["--sampler", "bogus=1"], ["unknown sampler option 'bogus'"]),
    (["--preset", "9nfe"], ["unknown sampler preset '9nfe'"]),
    (["--size", "100000x100000"], ["--size", "16,777,216 pixels"]),
    (["--size", "15x16"], ["15x16", "not divisible by 4"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
])
def test_bad_generate_flags_are_named_before_the_pipeline_is_loaded(
    pipeline_folder, tmp_path, capsys, no_pipeline_loading, extra, named
):
    code, error = run_cli(capsys, "generate", "--model", pipeline_folder, "--prompt", "a fox", "--size", "16x16",
                          "--device", "cpu", "--out", tmp_path / "images", *extra)
    assert_named_error(code, error, *named)
    assert not (tmp_path / "images").exists()


def test_generate_into_an_existing_file_is_refused_before_loading(pipeline_folder, tmp_path, capsys, no_pipeline_loading):
    target = tmp_path / "image.png"
    target.write_bytes(b"keep me")
    code, error = run_cli(capsys, "generate", "--model", pipeline_folder, "--prompt", "a fox", "--size", "16x16",
                          "--device", "cpu", "--out", target)
    assert_named_error(code, error, f"--out {target} is a file")
    assert target.read_bytes() == b"keep me"


def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(mnist_run, tmp_path, capsys, monkeypatch):
    """The write of step 6 fails as safetensors fails on a full disk; step 3 stays, intact and
    resumable, and no half-written folder is left."""
    import twinflow.train.checkpoint as checkpoint

    run = tmp_path / "run"
    shutil.copytree(mnist_run, run)
    shutil.rmtree(checkpoint_folder(run, 6))
    kept = snapshot(checkpoint_folder(run, 3))
    original = checkpoint.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "step_0000006" in filename:
            raise OSError(28, "No space left on device")  # safetensors' SafetensorError says the same
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    code, error = run_cli(capsys, "train", "--resume", "--out", run)
    assert_named_error(code, error, str(checkpoint_folder(run, 6)), "No space left on device", "step_0000003")
    assert list_checkpoints(run) == [checkpoint_folder(run, 3)]
    assert snapshot(checkpoint_folder(run, 3)) == kept
    assert not list((run / "checkpoints").glob(".*"))
    monkeypatch.setattr(checkpoint, "save_file", original)
    assert run_cli(capsys, "train", "--resume", "--out", run)[0] == 0  # space freed: it resumes
    assert list_checkpoints(run)[-1] == checkpoint_folder(run, 6)


# ---- validation that came too late (item 9) ---------------------------------------------------------


def test_an_empty_class_folder_is_named(tmp_path, capsys):
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "images" / "cat" / "a.png")
    (tmp_path / "images" / "dog" / "notes.txt").write_text("no images here")
    code, error = run_cli(capsys, "train", "--config", TINY, "--out", tmp_path / "run",
                          *sets(["device=cpu", "data.source=folder", f"data.root={tmp_path / 'images'}", "data.limit=null"]))
    assert_named_error(code, error, "['dog']", "hold no images")


# ---- probes that already held, kept --------------------------------------------------------------


def test_a_corrupt_image_and_a_missing_pipeline_part_are_named(pipeline_folder, tmp_path, capsys):
    images = tmp_path / "images" / "seven"
    images.mkdir(parents=True)
    Image.new("L", (8, 8)).save(images / "a.png")
    (images / "b.png").write_bytes(b"\x89PNG broken")
    code, error = run_cli(capsys, "train", "--config", TINY, "--out", tmp_path / "run",
                          *sets(["device=cpu", "data.source=folder", f"data.root={tmp_path / 'images'}", "data.limit=null"]))
    assert_named_error(code, error, str(images / "b.png"))
    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_folder, folder)
    shutil.rmtree(folder / "vae")
    code, error = run_cli(capsys, "generate", "--model", folder, "--prompt", "a fox", "--size", "16x16",
                          "--device", "cpu", "--out", tmp_path / "out")
    assert_named_error(code, error, "vae/")


def test_a_bug_prints_a_one_line_summary_before_its_traceback(monkeypatch, capsys):
    import twinflow.cli as cli

    def broken(arguments):
        raise KeyError("num_classes")

    monkeypatch.setattr(cli, "command_export", broken)
    code, error = run_cli(capsys, "export", "--checkpoint", "x", "--out", "y")
    assert code == 1
    first, *rest = error.splitlines()
    assert first.startswith("error: internal error") and "KeyError" in first and "num_classes" in first
    assert any(line.startswith("Traceback") for line in rest)


def test_the_console_script_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([str(SCRIPT), "sample", "--checkpoint", str(tmp_path), "--per-class", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--per-class" in result.stderr
    result = subprocess.run([str(SCRIPT), "sample", "--checkpoint", str(tmp_path / "missing"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no checkpoint" in result.stderr


def test_a_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL as soon as the first checkpoint exists (mid-run, possibly mid-write of the next);
    the resumed run ends bitwise where an uninterrupted run does."""
    overrides = sets(SMALL + ["phases.1.steps=21", "training.checkpoint_every=2", "training.keep_checkpoints=2"])
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "twinflow.cli", "train", "--config", str(TINY)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*command, "--out", str(whole), *overrides], check=True, env=environment, capture_output=True, timeout=600)
    process = subprocess.Popen([*command, "--out", str(killed), *overrides], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list_checkpoints(killed) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list_checkpoints(killed), "the run ended before a checkpoint was written"
    assert checkpoint_folder(killed, 24) not in list_checkpoints(killed), "the run finished before the kill"
    subprocess.run([*command, "--out", str(killed), "--resume", *overrides], check=True, env=environment,
                   capture_output=True, timeout=600)
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(str(checkpoint_folder(whole, 24) / name))
        got = load_file(str(checkpoint_folder(killed, 24) / name))
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
