"""Distributed training on the CPU: 2 processes, gloo, DDP and FSDP2 (twinflow.train.distributed).

The workers run in processes started by ``spawn`` (tests/spawn.py: each joins a fresh gloo
group on a free port) and report through files; the assertions run in the pytest process.
The last test launches ``torchrun -m twinflow.cli train`` as a user would.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from spawn import WORLD, spawn, train_under_torchrun

from twinflow.models import UNet, build_model
from twinflow.objective import TwinFlowObjective, objective_config
from twinflow.teacher import EMATeacher
from twinflow.train import safe_dcp
from twinflow.train.checkpoint import checkpoint_folder, export_consolidated, list_checkpoints, load_training_checkpoint
from twinflow.train.config import ConfigError, check_world_size, load_config
from twinflow.train.distributed import (
    DistributedContext,
    gathered_weights,
    objective_seed,
    repeated_blocks,
    setup_distributed,
    unwrap,
    wrap_model,
    wrap_teacher,
)
from twinflow.train.logging import read_metrics
from twinflow.train.loop import objective_loss, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# 6 steps (3 flow matching + 3 TwinFlow) of an even smaller network on 8x8 digits; a global
# batch of 8 (4 per process), checkpoints at 2, 4, 6 of which the last 2 are kept.
SMALL = [
    "device=cpu", "data.limit=32", "data.image_size=8", "training.batch_size=8",
    "model.channels=[8,16]", "model.groups=4", "model.embedding_dim=32", "model.attention_heads=2",
    "training.checkpoint_every=2", "training.keep_checkpoints=2", "training.log_every=2",
    "sampling.presets=[1nfe]", "sampling.per_class=1",
]


# ---- (a) the same loss and gradients as one process --------------------------------------------


def _tiny_network() -> UNet:
    torch.manual_seed(0)
    return build_model("unet", image_size=8, channels=[8, 16], groups=4, embedding_dim=32, attention_heads=2,
                       blocks_per_level=1)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(8, 1, 8, 8, generator=generator) * 2 - 1
    labels = torch.randint(0, 10, (8,), generator=generator)
    return images, labels


def _objective() -> TwinFlowObjective:
    return TwinFlowObjective(objective_config("twinflow"))


def _gradient_report(rank: int, out: Path) -> None:
    """Loss and gradients of one objective evaluation on this process's slice, per strategy."""
    context = setup_distributed("ddp", "cpu")
    images, labels = _global_batch()
    local = context.local_slice(torch.arange(len(images)))
    report = {}
    for strategy in ("ddp", "fsdp"):
        model = _tiny_network()
        teacher = wrap_teacher(EMATeacher(model, 0.9), strategy)
        wrapped = wrap_model(model, strategy)
        generator = torch.Generator().manual_seed(objective_seed(0, rank))
        result = objective_loss(_objective(), wrapped, teacher.network, images[local], labels[local], 10, generator)
        result.loss.backward()
        gradients = {
            name: parameter.grad.full_tensor() if hasattr(parameter.grad, "full_tensor") else parameter.grad
            for name, parameter in unwrap(wrapped).named_parameters()
        }
        report[strategy] = {"loss": context.mean({"loss": float(result.loss.detach())})["loss"], "gradients": gradients}
    # FSDP forwards inside gathered_weights need no partner: here the processes call the
    # sharded teacher a different number of times (the objective may do so too).
    x, times = images[local], torch.full((len(local),), 0.5)
    with torch.no_grad(), gathered_weights(teacher.network):
        outputs = [teacher.network(x, times, times, labels[local]) for _ in range(1 + 2 * rank)]
    report["uneven_calls"] = outputs[-1]
    # bf16: FSDP computes with bf16 weights (gathered) and keeps fp32 shards.
    model = wrap_model(_tiny_network(), "fsdp", precision="bf16")
    with gathered_weights(model):
        report["bf16_compute_dtype"] = next(model.parameters()).dtype
    report["bf16_shard_dtype"] = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(objective_seed(0, rank))
    result = objective_loss(_objective(), model, model, images[local], labels[local], 10, generator, "bf16")
    result.loss.backward()
    report["bf16_loss"] = context.mean({"loss": float(result.loss.detach())})["loss"]
    torch.save(report, out / f"rank{rank}.pt")


def test_ddp_and_fsdp_give_one_process_loss_and_gradients(spawned):
    # One process, the same global batch: each process's slice with its own random stream,
    # the losses averaged (what the all-reduce of the gradients computes).
    model = _tiny_network()
    teacher = EMATeacher(model, 0.9)
    images, labels = _global_batch()
    losses = []
    for rank in range(WORLD):
        local = DistributedContext(rank=rank, world_size=WORLD).local_slice(torch.arange(len(images)))
        generator = torch.Generator().manual_seed(objective_seed(0, rank))
        result = objective_loss(_objective(), model, teacher.network, images[local], labels[local], 10, generator)
        (result.loss / WORLD).backward()
        losses.append(float(result.loss.detach()))
    expected_loss = sum(losses) / WORLD
    expected = {name: parameter.grad for name, parameter in model.named_parameters()}

    reports = [torch.load(spawned / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for strategy in ("ddp", "fsdp"):
        for report in reports:
            got = report[strategy]
            assert got["loss"] == pytest.approx(expected_loss, rel=1e-6, abs=1e-7), strategy
            assert got["gradients"].keys() == expected.keys()
            for name, gradient in expected.items():
                torch.testing.assert_close(got["gradients"][name], gradient, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{strategy} {name}: {m}")
    assert any(float(g.abs().max()) > 0 for g in expected.values())
    # Uneven numbers of teacher calls under FSDP: no hang, and the full-model result.
    for rank, report in enumerate(reports):
        local = DistributedContext(rank=rank, world_size=WORLD).local_slice(torch.arange(len(images)))
        times = torch.full((len(local),), 0.5)
        with torch.no_grad():
            reference = teacher.network(images[local], times, times, labels[local])
        torch.testing.assert_close(report["uneven_calls"], reference, rtol=1e-5, atol=1e-6)
        assert report["bf16_compute_dtype"] == torch.bfloat16 and report["bf16_shard_dtype"] == torch.float32
        assert torch.isfinite(torch.tensor(report["bf16_loss"]))


# ---- (b) resume == uninterrupted, under FSDP (DCP checkpoints) and DDP ----------------------------


def _stopped_and_resumed_runs(rank: int, root: Path, configs: dict) -> None:
    """Per strategy: an uninterrupted run, and a run stopped after its step-4 checkpoint (a copy
    of that checkpoint and the logs up to it) that resumes and finishes."""
    for strategy, config in configs.items():
        uninterrupted, resumed = root / f"{strategy}_uninterrupted", root / f"{strategy}_resumed"
        train(config, uninterrupted)
        if rank == 0:
            shutil.copytree(checkpoint_folder(uninterrupted, 4), checkpoint_folder(resumed, 4))
            shutil.copy(uninterrupted / "metrics.jsonl", resumed / "metrics.jsonl")
        dist.barrier()
        train(config, resumed, resume=True)


def _worker(rank: int, root: Path, configs: dict) -> None:
    """Everything that needs the two processes, in one spawn (starting processes costs seconds)."""
    _gradient_report(rank, root)
    _stopped_and_resumed_runs(rank, root, configs)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, single_thread) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    configs = {strategy: load_config(TINY, SMALL + [f"distributed.strategy={strategy}"]) for strategy in ("fsdp", "ddp")}
    spawn(_worker, root, configs)
    return root


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors"])
def test_resume_equals_uninterrupted(spawned, strategy, name):
    """Bitwise: both runs do the same operations in the same order (gloo's two-process sums
    included), and a resume restores every state exactly, so nothing can round differently."""
    uninterrupted, resumed = spawned / f"{strategy}_uninterrupted", spawned / f"{strategy}_resumed"
    expected = load_file(str(checkpoint_folder(uninterrupted, 6) / name))
    got = load_file(str(checkpoint_folder(resumed, 6) / name))
    assert expected.keys() == got.keys() and expected
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"{strategy} {name}: resumed weights differ in {different[:5]}"
    at_four = load_file(str(checkpoint_folder(uninterrupted, 4) / name))
    assert any(not torch.equal(at_four[key], expected[key]) for key in expected)
    assert list_checkpoints(resumed) == [checkpoint_folder(resumed, 4), checkpoint_folder(resumed, 6)]
    # The same losses, step for step, logged once (by rank 0).
    timings = {"seconds_per_step", "training_seconds"}
    first, second = read_metrics(uninterrupted), read_metrics(resumed)
    assert [line["step"] for line in second] == [2, 4, 6]
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_distributed_checkpoint_folders(spawned, strategy):
    run = spawned / f"{strategy}_uninterrupted"
    assert list_checkpoints(run) == [checkpoint_folder(run, 4), checkpoint_folder(run, 6)]  # keep-last-2
    assert not list((run / "checkpoints").glob(".*"))  # no temporary folder left
    final = checkpoint_folder(run, 6)
    state = json.loads((final / "state.json").read_text())
    assert state["distributed"] == {"strategy": strategy, "world_size": WORLD}
    assert sorted(load_file(str(final / "random.safetensors"))) == ["objective_generator.rank0", "objective_generator.rank1"]
    sharded = final / "sharded"
    assert sharded.is_dir() == (strategy == "fsdp")
    assert (final / "optimizer.pt").is_file() == (strategy == "ddp")
    assert (run / "samples_1nfe.png").is_file() and (run / "summary.json").is_file()
    # The consolidated weights load as an ordinary checkpoint.
    from twinflow.pipeline import load

    samples = load(run, device="cpu").sample(labels=[3], preset="1nfe")
    assert samples.images.shape == (1, 1, 8, 8)


def test_export_consolidated_matches_the_gathered_weights(spawned, tmp_path):
    original = checkpoint_folder(spawned / "fsdp_uninterrupted", 6)
    copy = tmp_path / "step_0000006"
    shutil.copytree(original, copy)
    for name in ("model.safetensors", "ema.safetensors"):
        (copy / name).unlink()
    with pytest.raises(FileNotFoundError, match="export_consolidated"):
        from twinflow.train.checkpoint import load_checkpoint

        load_checkpoint(copy)
    export_consolidated(copy)
    for name in ("model.safetensors", "ema.safetensors"):
        expected, got = load_file(str(original / name)), load_file(str(copy / name))
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_resume_with_another_process_count_is_refused(spawned):
    model = _tiny_network()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"2 process\(es\) with distributed.strategy='ddp'.*same number"):
        load_training_checkpoint(DistributedContext(), spawned / "ddp_uninterrupted", model,
                                 EMATeacher(model, 0.99), optimizer, torch.Generator())


# ---- (b2) a tampered sharded checkpoint runs nothing ---------------------------------------------


class _CreatesMarker:
    """Unpickling this creates ``marker``: a stand-in for whatever code a tampered pickle could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _fsdp_config() -> dict:
    return load_config(TINY, SMALL + ["distributed.strategy=fsdp"])  # the fixture's fsdp config


def _resume_and_record(rank: int, run: Path, config: dict, out: Path) -> None:
    """Resume ``run``; record the ValueError it raises (or that it resumed) for the pytest process."""
    try:
        train(config, run, resume=True)
    except ValueError as error:
        (out / f"rank{rank}.txt").write_text(str(error))
    else:
        (out / f"rank{rank}.txt").write_text("resumed")


def test_tampered_dcp_metadata_runs_nothing_on_resume_or_export(spawned, tmp_path):
    run, marker, out = tmp_path / "run", tmp_path / "marker", tmp_path / "reports"
    shutil.copytree(spawned / "fsdp_uninterrupted", run)
    out.mkdir()
    metadata = list_checkpoints(run)[-1] / "sharded" / ".metadata"
    payload = pickle.dumps(_CreatesMarker(marker))
    metadata.write_bytes(payload)

    spawn(_resume_and_record, run, _fsdp_config(), out)
    for rank in range(WORLD):
        message = (out / f"rank{rank}.txt").read_text()
        assert "refusing to load DCP metadata" in message and "pathlib.Path.touch" in message, message
        assert str(metadata) in message
    assert not marker.exists()

    with pytest.raises(ValueError, match=r"refusing to load DCP metadata .*\.metadata: it names pathlib\.Path\.touch"):
        export_consolidated(metadata.parent.parent)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: an ordinary unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize("global_name, payload", [
    ("pathlib.Path.touch", lambda marker: pickle.dumps(_CreatesMarker(marker))),
    ("posix.system", lambda marker: b"cposix\nsystem\n(Vtouch " + str(marker).encode() + b"\ntR."),
    ("builtins.exec", lambda marker: b"cbuiltins\nexec\n(Vopen(" + repr(str(marker)).encode() + b", 'w')\ntR."),
])
def test_safe_reader_refuses_foreign_globals(spawned, tmp_path, global_name, payload):
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint_folder(spawned / "fsdp_uninterrupted", 6) / "sharded", sharded)
    genuine = safe_dcp.SafeFileSystemReader(sharded).read_metadata()  # a real FSDP metadata file loads
    assert genuine.state_dict_metadata == dcp.FileSystemReader(sharded).read_metadata().state_dict_metadata
    assert any(key.startswith("optimizer.") for key in genuine.state_dict_metadata)

    marker = tmp_path / "marker"
    (sharded / ".metadata").write_bytes(payload(marker))
    expected = f"refusing to load DCP metadata {sharded / '.metadata'}: it names {global_name}, which"
    with pytest.raises(ValueError, match=re.escape(expected)):
        safe_dcp.SafeFileSystemReader(sharded).read_metadata()
    assert not marker.exists()


def test_safe_reader_refuses_data_files_outside_the_folder(spawned, tmp_path):
    """A tampered (but well-typed) metadata file must not make DCP read another file."""
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint_folder(spawned / "fsdp_uninterrupted", 6) / "sharded", sharded)
    metadata = dcp.FileSystemReader(sharded).read_metadata()
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "../../elsewhere.distcp"
    metadata.storage_meta = None
    (sharded / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"points a data file at '\.\./\.\./elsewhere\.distcp', outside"):
        safe_dcp.SafeFileSystemReader(sharded).read_metadata()


def test_safe_reader_wants_a_metadata_record(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(ValueError, match="holds a dict, not a Metadata"):
        safe_dcp.SafeFileSystemReader(tmp_path).read_metadata()


def test_safe_planner_loads_plain_values_and_refuses_pickled_code(tmp_path):
    """Non-tensor entries (BYTE_IO, e.g. the optimizer's param_groups) go through load_bytes."""
    groups = [{"lr": 0.1, "betas": (0.9, 0.99), "amsgrad": False, "foreach": None, "params": ["a.weight", "a.bias"]}]
    stored = {"param_groups": groups, "note": "plain", "weights": torch.arange(4.0)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(stored, checkpoint_id=tmp_path / "plain", no_dist=True)
        # DCP loads the entries the template names, each a value of its own (param_groups.0.lr, ...).
        loaded = {"param_groups": [dict.fromkeys(groups[0], 0)], "note": "", "weights": torch.zeros(4)}
        safe_dcp.load(loaded, tmp_path / "plain", no_dist=True)
        assert loaded["param_groups"] == groups and loaded["note"] == "plain"
        assert torch.equal(loaded["weights"], stored["weights"])

        marker = tmp_path / "marker"
        dcp.save({"param_groups": [{"lr": _CreatesMarker(marker)}]}, checkpoint_id=tmp_path / "tampered", no_dist=True)
        with pytest.raises(ValueError, match=r"refusing to load entry 'param_groups.*' of DCP checkpoint .*tampered: "
                                             r"torch's weights-only unpickler refused it"):
            safe_dcp.load({"param_groups": [{"lr": 0.0}]}, tmp_path / "tampered", no_dist=True)
    assert not marker.exists()
    # The payload is live: the same bytes, torch.save'd, run under an unrestricted torch.load.
    buffer = io.BytesIO()
    torch.save(_CreatesMarker(marker), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)
    assert marker.exists()


# ---- (c) configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("distributed.strategy=zero3", "distributed.strategy"),
    ("distributed.consolidate=maybe", "distributed.consolidate"),
    ("distributed.backend=nccl", "distributed.backend"),
    ("distributed=ddp", "distributed"),
])
def test_distributed_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert key in str(error.value)


def test_distributed_defaults():
    config = load_config(None, ["distributed.strategy=fsdp"])
    assert config["distributed"] == {"strategy": "fsdp", "consolidate": True, "find_unused_parameters": False}
    assert load_config()["distributed"]["strategy"] == "none"


def test_global_batch_must_split_over_the_processes():
    config = load_config(None, ["training.batch_size=12"])
    check_world_size(config, 2)
    check_world_size(config, 3)
    with pytest.raises(ConfigError, match=r"training\.batch_size \(12\).*divisible.*\(5\)"):
        check_world_size(config, 5)
    # 2 or 1 per process train the twinflow objective too: its 4 slices rotate (spec 2.1)
    check_world_size(config, 6)
    check_world_size(config, 12)
    with pytest.raises(ConfigError, match=r"divisible.*\(24\), e\.g\. 24"):
        check_world_size(config, 24)


def test_one_process_runs_without_a_group_whatever_the_strategy(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = setup_distributed("fsdp", "cpu")
    assert (context.world_size, context.rank, context.strategy, context.enabled) == (1, 0, "none", False)
    indices = torch.arange(8)
    assert torch.equal(context.local_slice(indices), indices)
    model = _tiny_network()
    assert wrap_model(model, "none") is model
    with pytest.raises(ConfigError, match="distributed.strategy"):
        setup_distributed("zero3", "cpu")


def test_strategy_none_under_torchrun_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"distributed\.strategy is 'none' but 2 processes"):
        setup_distributed("none", "cpu")


def test_slices_of_the_global_batch_cover_it_once():
    indices = torch.randperm(12)
    parts = [DistributedContext(rank=rank, world_size=3).local_slice(indices) for rank in range(3)]
    assert torch.equal(torch.cat(parts), indices)


def test_repeated_blocks_are_the_unet_blocks():
    model = _tiny_network()
    blocks = repeated_blocks(model)
    expected = [*model.down_blocks, *model.downsamplers, *model.up_blocks, *model.upsamplers]
    assert sorted(map(id, blocks)) == sorted(map(id, expected))


# ---- (d) torchrun, as a user launches it -------------------------------------------------------


def test_torchrun_cli_ddp(tmp_path):
    out = tmp_path / "run"
    finished = train_under_torchrun(TINY, out, SMALL + ["distributed.strategy=ddp"], timeout=300)
    assert "ddp: 2 processes, 4 samples each per micro-step" in finished.stdout
    final = checkpoint_folder(out, 6)
    assert json.loads((final / "state.json").read_text())["distributed"] == {"strategy": "ddp", "world_size": 2}
    assert [line["step"] for line in read_metrics(out)] == [2, 4, 6]
    from twinflow.pipeline import load

    assert load(out, device="cpu").sample(labels=[1], preset="1nfe").images.shape == (1, 1, 8, 8)
