"""Text-to-image training under DDP and FSDP2 on the CPU: 2 gloo processes, the tiny Z-Image
transformer and latent cache of tests/tiny_text_to_image.py, a global batch of 8 (4 per process).

One spawn (tests/spawn.py) runs everything that needs the two processes, since starting them
and importing diffusers in each costs more than the training; the workers report through files
and the assertions run in the pytest process:

* (a) LoRA: the loss and the adapter gradients of one objective evaluation, each process on its
  half of the global batch (DDP all-reduce, FSDP2 reduce-scatter), equal those of one process
  on the whole batch; the frozen base and the ``ema`` adapter get no gradients. Also under FSDP2
  with a bfloat16 base (``model.dtype: bf16``), to bf16 precision.
* (b) LoRA under FSDP2 through ``train``: a run stopped before its last checkpoint and resumed
  ends bitwise where the uninterrupted run does (``default`` and ``ema`` adapters); it matches a
  DDP run of the same config; checkpoints hold the adapters only, and they consolidate and export.
* (c) full-parameter training under FSDP2 (the EMA teacher a sharded copy): resumed equals
  uninterrupted, bitwise, and the shards consolidate into the weights the run gathered.
* (d) LoRA with ``train_second_embedding`` (``t_embedder_2`` trains in full, in FSDP's root unit
  next to the sharded blocks) and ``grad_accumulation: 2`` (the gradient sync skipped on the
  first micro-step) under FSDP2: resumed equals uninterrupted, bitwise; ``t_embedder_2`` moves
  away from its copy-initialisation; checkpoints hold the adapters and ``t_embedder_2`` only;
  the run matches a DDP run of the same config.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from spawn import WORLD, spawn

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tiny_text_to_image import LORA, TINY, save_tiny_transformer, write_tiny_cache  # noqa: E402

from twinflow.objective import TwinFlowObjective  # noqa: E402
from twinflow.path import get_path  # noqa: E402
from twinflow.train.lora import teacher_for  # noqa: E402
from twinflow.train.backbone import build_backbone  # noqa: E402
from twinflow.train.checkpoint import (  # noqa: E402
    SHARDED_FOLDER,
    checkpoint_folder,
    export_consolidated,
    list_checkpoints,
)
from twinflow.train.config import load_config, phase_objective  # noqa: E402
from twinflow.train.data import load_training_data  # noqa: E402
from twinflow.train.distributed import (  # noqa: E402
    DistributedContext,
    objective_seed,
    repeated_blocks,
    setup_distributed,
    unwrap,
    wrap_model,
    wrap_teacher,
)
from twinflow.train.logging import read_metrics  # noqa: E402
from twinflow.train.lora import model_weights  # noqa: E402
from twinflow.train.loop import objective_loss, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

GLOBAL_BATCH = 8  # the whole tiny cache: 4 latents per process
STEPS = 4  # configs/tiny_text_to_image.yaml: 4 steps, checkpoints at 2 and 4
# What the workers train (the ddp runs are not resumed).
RUNS = ("lora_fsdp", "lora_ddp", "full_fsdp", "emb2_accum_fsdp", "emb2_accum_ddp")
SECOND_EMBEDDING = "transformer.t_embedder_2."  # Z-Image's emb_2, under its released name
ACCUMULATION = 2
GRADIENTS = {"ddp": "lora_ddp", "fsdp": "lora_fsdp", "fsdp_bf16": "lora_bf16"}  # report entry: its config


# ---- set-up: one spawn for everything -----------------------------------------------------------


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, dict]:
    transformer = save_tiny_transformer(tmp_path_factory.mktemp("z_image") / "transformer")
    cache = write_tiny_cache(tmp_path_factory.mktemp("cache") / "latents")
    common = [f"model.path={transformer}", f"data.root={cache}", f"training.batch_size={GLOBAL_BATCH}"]
    return {
        "lora_fsdp": load_config(TINY, [*common, LORA, "distributed.strategy=fsdp"]),
        "lora_ddp": load_config(TINY, [*common, LORA, "distributed.strategy=ddp"]),
        "full_fsdp": load_config(TINY, [*common, "distributed.strategy=fsdp"]),
        # The large-model set-up: a bfloat16 frozen base with float32 adapters in one FSDP unit.
        "lora_bf16": load_config(TINY, [*common, LORA, "model.dtype=bf16", "precision=bf16", "distributed.strategy=fsdp"]),
        # (d): emb_2 trained in full next to the adapters, two micro-batches per step.
        **{
            f"emb2_accum_{strategy}": load_config(TINY, [
                *common, LORA.replace("}", ", train_second_embedding: true}"),
                f"training.grad_accumulation={ACCUMULATION}", f"distributed.strategy={strategy}",
            ])
            for strategy in ("fsdp", "ddp")
        },
    }


def _lora_model(config: dict, data) -> torch.nn.Module:
    """The LoRA model of ``config`` with every adapter weight drawn at random (seeded).

    PEFT starts ``lora_B`` at zero, where ``lora_A`` gets no gradient, and ``ema`` equal to
    ``default``, where the teacher is the student: random adapters test every gradient and a
    teacher that differs.
    """
    torch.manual_seed(config["seed"])
    model, _ = build_backbone(config, data)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _objective(config: dict) -> TwinFlowObjective:
    return TwinFlowObjective(phase_objective(config["phases"][0], "phases.0"), get_path("linear"))


def _gradient_report(rank: int, root: Path, configs: dict[str, dict]) -> None:
    """(a) Loss and gradients of one LoRA objective evaluation on this process's half, per strategy."""
    context = setup_distributed("ddp", "cpu")
    report = {}
    for entry, name in GRADIENTS.items():
        config = configs[name]
        data = load_training_data(config["data"])
        latents, condition, null = data.batch(context.local_slice(torch.arange(GLOBAL_BATCH)), torch.device("cpu"))
        model = _lora_model(config, data)
        teacher = teacher_for(model, float(config["training"]["ema_decay"]))
        teacher = wrap_teacher(teacher, config["distributed"]["strategy"], config["precision"])
        wrapped = wrap_model(model, config["distributed"]["strategy"], config["precision"])
        generator = torch.Generator().manual_seed(objective_seed(config["seed"], rank))
        result = objective_loss(
            _objective(config), wrapped, teacher.network, latents, condition, null, generator, config["precision"]
        )
        result.loss.backward()
        gradients = {
            name: parameter.grad.full_tensor() if hasattr(parameter.grad, "full_tensor") else parameter.grad
            for name, parameter in unwrap(wrapped).named_parameters() if parameter.grad is not None
        }
        report[entry] = {"loss": context.mean({"loss": float(result.loss.detach())})["loss"], "gradients": gradients}
    torch.save(report, root / f"gradients_rank{rank}.pt")


def _runs(rank: int, root: Path, name: str, config: dict) -> None:
    """An uninterrupted run; for FSDP also a copy of it stopped before its last checkpoint
    (that checkpoint deleted) and resumed."""
    uninterrupted = root / f"{name}_uninterrupted"
    train(config, uninterrupted)
    if config["distributed"]["strategy"] != "fsdp":
        return
    resumed = root / f"{name}_resumed"
    if rank == 0:
        shutil.copytree(uninterrupted, resumed)
        shutil.rmtree(checkpoint_folder(resumed, STEPS))
    dist.barrier()
    train(config, resumed, resume=True)


def _worker(rank: int, root: Path, configs: dict[str, dict]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 copy-initialised from a plain pretrained folder
        _gradient_report(rank, root, configs)
        for name in RUNS:
            _runs(rank, root, name, configs[name])


@pytest.fixture(scope="module")
def spawned(configs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed_text_to_image")
    spawn(_worker, root, configs)
    return root


def _weights(run: Path, step: int = STEPS, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_folder(run, step) / name))


def _adapter_names(config: dict) -> set[str]:
    """What a one-process LoRA checkpoint of ``config`` holds: the default and ema adapters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return set(model_weights(_lora_model(config, load_training_data(config["data"]))))


# ---- (a) LoRA: one objective evaluation on 2 processes == one process on the global batch --------


def _one_process(config: dict) -> tuple[float, dict[str, torch.Tensor], set[str]]:
    """Loss and gradients of one process that evaluates every process's half with that process's
    random stream and averages the losses (what the all-reduce of the gradients computes), and
    the names of the trainable parameters."""
    data = load_training_data(config["data"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _lora_model(config, data)
    teacher = teacher_for(model, float(config["training"]["ema_decay"]))
    losses = []
    for rank in range(WORLD):
        local = DistributedContext(rank=rank, world_size=WORLD).local_slice(torch.arange(GLOBAL_BATCH))
        latents, condition, null = data.batch(local, torch.device("cpu"))
        generator = torch.Generator().manual_seed(objective_seed(config["seed"], rank))
        result = objective_loss(
            _objective(config), model, teacher.network, latents, condition, null, generator, config["precision"]
        )
        (result.loss / WORLD).backward()
        losses.append(float(result.loss.detach()))
    gradients = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return sum(losses) / WORLD, gradients, trainable


def _reports(root: Path) -> list[dict]:
    return [torch.load(root / f"gradients_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def test_lora_loss_and_gradients_equal_one_process_on_the_global_batch(spawned, configs):
    loss, expected, trainable = _one_process(configs["lora_fsdp"])
    # Only the trained adapter has gradients, every one of its weights (lora_B is random, so lora_A's too).
    assert expected and all(".lora_A.default." in name or ".lora_B.default." in name for name in expected)
    assert set(expected) == trainable
    assert all(float(gradient.abs().max()) > 0 for gradient in expected.values())
    for report in _reports(spawned):
        for strategy in ("ddp", "fsdp"):
            got = report[strategy]
            assert got["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-7), strategy
            assert got["gradients"].keys() == expected.keys(), strategy  # no gradient for the base or ema
            for name, gradient in expected.items():
                torch.testing.assert_close(got["gradients"][name], gradient, rtol=1e-5, atol=1e-6,
                                           msg=lambda message: f"{strategy} {name}: {message}")


def test_lora_on_a_bfloat16_base_under_fsdp(spawned, configs):
    """A bf16 base and fp32 adapters share each FSDP unit (``model.dtype: bf16``, the large
    models' LoRA set-up). FSDP computes with bf16 copies of the adapters (its mixed-precision
    policy) and reduces their gradients in fp32; one process keeps fp32 adapters that autocast
    casts to bf16 in each matrix product. With the objective's single differentiable forward
    the two give the same gradients here, but they need not in general (a bf16 gradient
    accumulated over several differentiable calls rounds differently): the check allows bf16's
    precision (2**-8 relative), far below the error of a wrong average (a factor of 2)."""
    loss, expected, _ = _one_process(configs["lora_bf16"])
    for report in _reports(spawned):
        got = report["fsdp_bf16"]
        assert got["loss"] == pytest.approx(loss, rel=1e-2)
        assert got["gradients"].keys() == expected.keys()
        assert all(gradient.dtype == torch.float32 for gradient in got["gradients"].values())
        for name, gradient in expected.items():
            error = float((got["gradients"][name] - gradient).norm() / gradient.norm())
            assert error < 1e-2, f"{name}: relative error {error:.3g}"


# ---- (b) LoRA under FSDP2 through train() --------------------------------------------------------


def test_lora_fsdp_resume_equals_uninterrupted(spawned, configs):
    """Bitwise: the same operations in the same order (gloo's two-process sums included), and the
    resume restores the adapters, the optimizer state, the EMA warm-up and both random streams."""
    uninterrupted, resumed = spawned / "lora_fsdp_uninterrupted", spawned / "lora_fsdp_resumed"
    expected, got = _weights(uninterrupted), _weights(resumed)
    assert set(expected) == set(got) == _adapter_names(configs["lora_fsdp"])
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"resumed adapters differ in {different[:5]}"
    assert list_checkpoints(resumed) == [checkpoint_folder(resumed, 2), checkpoint_folder(resumed, STEPS)]
    # Both adapters trained: default moved since step 2, and the EMA (PEFT starts B at zero) followed.
    at_two = _weights(uninterrupted, 2)
    assert any(not torch.equal(at_two[key], expected[key]) for key in expected if ".default." in key)
    ema_b = [value for key, value in expected.items() if ".lora_B.ema." in key]
    assert ema_b and all(float(value.abs().max()) > 0 for value in ema_b)
    assert any(not torch.equal(value, expected[key.replace(".ema.", ".default.")])
               for key, value in expected.items() if ".ema." in key)
    timings = {"seconds_per_step", "training_seconds"}
    first, second = read_metrics(uninterrupted), read_metrics(resumed)
    assert [line["step"] for line in second] == [2, STEPS]
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}


@pytest.mark.parametrize("name", ["lora", "emb2_accum"], ids=["lora", "emb2_accumulation"])
def test_lora_fsdp_run_equals_the_ddp_run(spawned, name):
    """FSDP2 (sharded adapters and optimizer, the EMA blended shard by shard) against DDP (full
    copies) on the same data and random streams; also with t_embedder_2 trained and two
    micro-batches. A one-process run draws other noise (one stream, not one per process), so DDP
    stands in for it: its gradients are one process's (a). The gradient norm that clipping uses
    is summed in another order under FSDP (shards, then across processes), so the runs agree to
    rounding rather than bitwise."""
    fsdp_run, ddp_run = spawned / f"{name}_fsdp_uninterrupted", spawned / f"{name}_ddp_uninterrupted"
    fsdp, ddp = _weights(fsdp_run), _weights(ddp_run)
    assert fsdp.keys() == ddp.keys()
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=1e-5, atol=1e-6, msg=lambda message: f"{key}: {message}")
    fsdp_losses = [line["loss"] for line in read_metrics(fsdp_run)]
    ddp_losses = [line["loss"] for line in read_metrics(ddp_run)]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-5)


def test_lora_fsdp_checkpoints_hold_only_the_adapters(spawned, configs, tmp_path):
    import torch.distributed.checkpoint as dcp

    final = checkpoint_folder(spawned / "lora_fsdp_uninterrupted", STEPS)
    names = _adapter_names(configs["lora_fsdp"])
    stored = dcp.FileSystemReader(str(final / SHARDED_FOLDER)).read_metadata().state_dict_metadata
    assert {key[len("model."):] for key in stored if key.startswith("model.")} == names  # no frozen base
    assert not any(key.startswith("ema.") for key in stored)  # the EMA is the model's ema adapter
    assert not (final / "ema.safetensors").exists()
    # export_consolidated (consolidate: false) rebuilds the same adapter file from the shards.
    copy = tmp_path / final.name
    shutil.copytree(final, copy)
    (copy / "model.safetensors").unlink()
    export_consolidated(copy)
    consolidated, exported = _weights(spawned / "lora_fsdp_uninterrupted"), load_file(str(copy / "model.safetensors"))
    assert consolidated.keys() == exported.keys() == names
    assert all(torch.equal(consolidated[key], exported[key]) for key in names)


@pytest.mark.parametrize("use_ema", [False, True])
def test_lora_fsdp_run_exports_its_adapters(spawned, configs, tmp_path, use_ema):
    from twinflow.train.export import export_diffusers, load_lora_export

    run = spawned / "lora_fsdp_uninterrupted"
    out = export_diffusers(run, tmp_path / "export", use_ema=use_ema)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_lora_export(configs["lora_fsdp"]["model"]["path"], out).state_dict()
    source = ".ema." if use_ema else ".default."
    expected = {key.replace(source, ".default."): value for key, value in _weights(run).items() if source in key}
    assert expected and all(torch.equal(loaded[key], value) for key, value in expected.items())


# ---- (c) full-parameter training under FSDP2 -----------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors"])
def test_full_parameter_fsdp_resume_equals_uninterrupted(spawned, configs, name):
    uninterrupted, resumed = spawned / "full_fsdp_uninterrupted", spawned / "full_fsdp_resumed"
    expected, got = _weights(uninterrupted, name=name), _weights(resumed, name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        fresh = build_backbone(configs["full_fsdp"], load_training_data(configs["full_fsdp"]["data"]))[0].state_dict()
    assert set(expected) == set(got) == set(fresh)  # the whole adapted transformer, emb_2 included
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"{name}: resumed weights differ in {different[:5]}"
    changed = [key for key in fresh if not torch.equal(fresh[key], expected[key])]
    assert len(changed) > len(fresh) // 2  # trained (the EMA too), not just carried along
    model, ema = _weights(uninterrupted), _weights(uninterrupted, name="ema.safetensors")
    assert any(not torch.equal(model[key], ema[key]) for key in model)


def test_full_parameter_fsdp_checkpoint_consolidates_from_its_shards(spawned, tmp_path):
    """export_consolidated rebuilds the diffusers model from ``model.path`` as the template and
    gives what the run gathered itself (model and sharded EMA copy)."""
    final = checkpoint_folder(spawned / "full_fsdp_uninterrupted", STEPS)
    copy = tmp_path / final.name
    shutil.copytree(final, copy)
    for name in ("model.safetensors", "ema.safetensors"):
        (copy / name).unlink()
    export_consolidated(copy)
    for name in ("model.safetensors", "ema.safetensors"):
        expected, got = load_file(str(final / name)), load_file(str(copy / name))
        assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected), name


# ---- one process: which modules FSDP shards one by one -------------------------------------------


def test_repeated_blocks_are_the_transformer_blocks(configs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _lora_model(configs["lora_fsdp"], load_training_data(configs["lora_fsdp"]["data"]))
    transformer = model.transformer
    expected = [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]
    blocks = repeated_blocks(model)
    assert sorted(map(id, blocks)) == sorted(map(id, expected))  # not each attention's to_out[0] as well


# ---- (d) LoRA + train_second_embedding + grad_accumulation under FSDP2 ---------------------------


def _emb2_names(config: dict) -> tuple[set[str], set[str]]:
    """The checkpoint names of ``config`` split into (adapters, t_embedder_2)."""
    names = _adapter_names(config)
    second = {name for name in names if name.startswith(SECOND_EMBEDDING)}
    return names - second, second


def test_lora_emb2_accumulation_fsdp_resume_equals_uninterrupted(spawned, configs):
    uninterrupted, resumed = spawned / "emb2_accum_fsdp_uninterrupted", spawned / "emb2_accum_fsdp_resumed"
    expected, got = _weights(uninterrupted), _weights(resumed)
    adapters, second = _emb2_names(configs["emb2_accum_fsdp"])
    assert second and set(expected) == set(got) == adapters | second
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"resumed weights differ in {different[:5]}"
    assert list_checkpoints(resumed) == [checkpoint_folder(resumed, 2), checkpoint_folder(resumed, STEPS)]
    # Two micro-batches per optimizer step: the data order is 2 * steps global batches on.
    for step in (2, STEPS):
        state = json.loads((checkpoint_folder(resumed, step) / "state.json").read_text())
        assert state["data_order"] == {"epoch": ACCUMULATION * step - 1, "position": GLOBAL_BATCH}
    timings = {"seconds_per_step", "training_seconds"}
    first, second_run = read_metrics(uninterrupted), read_metrics(resumed)
    assert [line["step"] for line in second_run] == [2, STEPS]
    for a, b in zip(first, second_run):
        assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}


def test_lora_emb2_accumulation_fsdp_trains_the_second_embedding(spawned, configs):
    """t_embedder_2 starts as a copy of t_embedder (the pretrained folder has none) and trains in
    full: every tensor of it differs from that copy after step 2 and it moves again by step 4;
    the adapters train too, and the base's t_embedder stays out of the checkpoint."""
    config = configs["emb2_accum_fsdp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(config["seed"])
        fresh = build_backbone(config, load_training_data(config["data"]))[0].state_dict()
    run = spawned / "emb2_accum_fsdp_uninterrupted"
    at_two, final = _weights(run, 2), _weights(run)
    second = sorted(key for key in final if key.startswith(SECOND_EMBEDDING))
    assert second and not any(key.startswith("transformer.t_embedder.") for key in final)
    for key in second:
        initial = fresh[key.replace("t_embedder_2.", "t_embedder.")]  # the copy-initialisation
        assert torch.equal(fresh[key], initial)
        assert final[key].dtype == torch.float32
        assert not torch.equal(at_two[key], initial), f"{key} did not train"
    assert any(not torch.equal(at_two[key], final[key]) for key in second)
    assert any(not torch.equal(at_two[key], final[key]) for key in final if ".default." in key)
    assert any(not torch.equal(value, final[key.replace(".ema.", ".default.")])
               for key, value in final.items() if ".ema." in key)


def test_lora_emb2_accumulation_fsdp_checkpoints_hold_adapters_and_emb2_only(spawned, configs):
    import torch.distributed.checkpoint as dcp

    adapters, second = _emb2_names(configs["emb2_accum_fsdp"])
    assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
    final = checkpoint_folder(spawned / "emb2_accum_fsdp_uninterrupted", STEPS)
    stored = dcp.FileSystemReader(str(final / SHARDED_FOLDER)).read_metadata().state_dict_metadata
    assert {key[len("model."):] for key in stored if key.startswith("model.")} == adapters | second  # no base
    assert not any(key.startswith("ema.") for key in stored)
    # The optimizer holds state for t_embedder_2 and the default adapter only.
    optimized = {key.split(".", 2)[2] for key in stored if key.startswith("optimizer.state.")}
    trained = {name for name in adapters if ".default." in name} | second
    assert {name.rsplit(".", 1)[0] for name in optimized} == trained
    assert set(_weights(spawned / "emb2_accum_fsdp_uninterrupted")) == adapters | second

