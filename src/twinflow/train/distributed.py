"""Distributed training with PyTorch's own engine: DDP or FSDP2 under ``torchrun``.

Launch N processes on one machine with::

    torchrun --nproc_per_node N -m twinflow.cli train --config configs/tiny.yaml \\
        --out runs/ddp --set distributed.strategy=ddp        # or fsdp

Without torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) a run is one process and nothing is wrapped, whatever the strategy says.

How a run with N processes relates to a run with one:

* **Data.** ``training.batch_size`` is the *global* batch of one micro-step. Every process walks
  the same seeded :class:`~twinflow.data.ShuffledBatches` order of global batches and takes its
  contiguous slice ``[rank * b, (rank + 1) * b)`` with ``b = batch_size / N``, so the N processes
  together see exactly the batches one process sees with the same config, and the data position
  stored in a checkpoint is the same for any N. The batch size must be divisible by N.
* **Randomness.** Each process draws the objective's noise and times from its own
  ``torch.Generator`` seeded with :func:`objective_seed` ``(seed, rank)``; rank 0 gets the seed of
  a one-process run. Every process's generator state is saved (``random.safetensors``, one entry
  per rank), so a resume continues every stream; it needs the same number of processes.
* **Gradients.** DDP averages the gradients over the processes after ``backward``; FSDP2
  reduce-scatters their average. The step is therefore the gradient of the mean, over the
  processes, of each process's loss on its slice. With gradient accumulation the gradients are
  synchronised on the last micro-step only.
* **EMA teacher.** Under DDP every process keeps a full copy, updated identically (the models
  are identical after every step). Under FSDP the teacher is a copy of the model sharded exactly
  like the model (same blocks, same mesh, same mixed precision): each process blends its own
  shards, ``teacher_shard.lerp_(model_shard)``, without any communication, and the teacher stays
  a module the objective can call. An EMA of bare local shards would need a second way to run
  the teacher; the sharded copy needs none. A LoRA run's teacher is the model's second adapter
  (``ema``): it is sharded with the model and blended shard by shard the same way.
* **LoRA.** The frozen base and the adapters are sharded together, block by block: FSDP2
  gathers the frozen weights for the forwards and reduce-scatters only the adapters'
  gradients. Checkpoints hold the adapters only (:func:`stored_names`), sharded and
  consolidated alike; the base comes from ``model.path`` again.
* **FSDP and the objective's network calls.** The objective's number of no-gradient calls
  depends on each process's random times (e.g. the guidance call is skipped when no time falls
  in the guidance range), while every FSDP forward is a collective all-gather. So the model and
  the teacher are sharded with ``reshard_after_forward=False`` and all-gathered once, in the same
  order on every process, before the objective runs (:func:`gathered_weights`); the forwards then
  communicate nothing and the processes may call the networks different numbers of times. The
  weights are resharded after the objective; the backward gathers block by block as usual. The
  price: the full (bf16 with ``precision: bf16``) weights of model and teacher live on every
  device during the objective; gradients and optimizer state stay sharded.
* **Checkpoints.** ``none`` and ``ddp``: the ordinary checkpoint (rank 0 writes it; the model
  and optimizer are replicated). ``fsdp``: every process writes its shards of model, EMA and
  optimizer with ``torch.distributed.checkpoint`` (DCP) into ``sharded/`` of the checkpoint's
  temporary folder; after a barrier rank 0 adds ``state.json`` and ``random.safetensors`` and
  renames the folder into place, then prunes to the newest ``training.keep_checkpoints``. With
  ``distributed.consolidate: true`` (the default) rank 0 also gathers the full weights into
  ``model.safetensors`` / ``ema.safetensors`` (a LoRA run: the adapters only, gathered without
  the base), so ``twinflow sample``, ``twinflow.load`` and ``export_diffusers`` read
  the checkpoint like any other (this holds one full copy in rank 0's CPU memory: fine for small
  models; switch it off for large ones and use :func:`export_consolidated` later, on one
  process). The checkpoint folder must be on a file system all processes share.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from twinflow.devices import resolve_device
from twinflow.teacher import EMATeacher
from twinflow.train.lora import is_lora, load_model_weights, model_weights
from twinflow.train.checkpoint import (
    SHARDED_FOLDER,
    Checkpoint,
    checkpoint_folder,
    finish_checkpoint,
    load_checkpoint,
    read_state,
    start_checkpoint,
    temporary_folder,
)
from twinflow.train.config import STRATEGIES, ConfigError

# Rank r's objective generator is seeded with seed + 1 + r * RANK_SEED_STRIDE: rank 0 keeps the
# one-process seed (seed + 1), and the other ranks stay far from the data order's seed + epoch.
RANK_SEED_STRIDE = 1_000_003
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes, its device, the strategy.

    ``strategy`` is the one in effect: ``"none"`` for a single process whatever the config asked.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"
    owns_process_group: bool = False  # joined by setup_distributed: left again by close()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, progress, grids, summaries and the checkpoint folder."""
        return self.rank == 0

    def local_slice(self, indices: Tensor) -> Tensor:
        """This process's contiguous share of a global batch of indices."""
        if len(indices) % self.world_size:
            raise ValueError(f"a global batch of {len(indices)} does not split over {self.world_size} processes")
        share = len(indices) // self.world_size
        return indices[self.rank * share : (self.rank + 1) * share]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_true(self, flag: bool | Tensor) -> bool:
        """True when ``flag`` holds on every process (every process must call this)."""
        if not self.enabled:
            return bool(flag)
        value = torch.tensor(1.0 if bool(flag) else 0.0, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The average of each value over the processes (every process must call this)."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        stacked = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked)
        return {key: float(value) / self.world_size for key, value in zip(keys, stacked.tolist())}

    def gather(self, value: object) -> list:
        """Every process's ``value``, in rank order, on every process."""
        if not self.enabled:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        """Leave the process group if :func:`setup_distributed` joined it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed(strategy: str = "none", device: str | torch.device = "auto") -> DistributedContext:
    """Join the process group torchrun describes (or reuse one already joined), pick the device.

    Backend: nccl on CUDA, gloo on the CPU. On CUDA each process takes ``cuda:LOCAL_RANK``
    (a configured ``cuda:N`` only says "CUDA" under torchrun).
    A single process (no torchrun, no process group, or a world of one) runs ``"none"``.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    device = resolve_device(device)
    joined = dist.is_available() and dist.is_initialized()
    if not joined and not launched_by_torchrun():
        return DistributedContext(device=device)
    world_size = dist.get_world_size() if joined else int(os.environ["WORLD_SIZE"])
    if world_size > 1 and strategy == "none":
        raise ConfigError(
            f"distributed.strategy is 'none' but {world_size} processes were started; "
            "set distributed.strategy to 'ddp' or 'fsdp' (or start one process)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not joined:
        if world_size == 1:
            return DistributedContext(device=device)
        missing = [name for name in ENVIRONMENT if name not in os.environ]
        if missing:
            raise RuntimeError(f"torchrun environment incomplete: {missing} not set")
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        owns = True
    context = DistributedContext(
        rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, device=device,
        strategy=strategy if world_size > 1 else "none", owns_process_group=owns,
    )
    return context


def objective_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s objective generator (noise and times)."""
    return seed + 1 + rank * RANK_SEED_STRIDE


def generator_key(rank: int, world_size: int) -> str:
    """Name of a rank's generator state in ``random.safetensors`` (one process: the old name)."""
    return "objective_generator" if world_size == 1 else f"objective_generator.rank{rank}"


# ---- wrapping ---------------------------------------------------------------------------------


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one, innermost first.

    A diffusers (or transformers) model names its blocks: every module whose class is listed
    in some submodule's ``_no_split_modules`` (the unit accelerate and FSDP wrap policies keep
    whole) or ``_repeated_blocks``, e.g. ``ZImageTransformerBlock``. Otherwise the items of
    every ``nn.ModuleList`` (the U-Net's blocks). The named classes matter for transformers: their
    attention keeps ``to_out`` in a ``ModuleList`` too, and sharding each output projection
    as a unit of its own would add an all-gather per layer for one small matrix.
    """
    declared = {
        name for module in model.modules()
        for attribute in ("_no_split_modules", "_repeated_blocks") for name in (getattr(module, attribute, None) or ())
    }
    blocks = [module for module in model.modules() if type(module).__name__ in declared]
    if not blocks:
        blocks = [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]
    return blocks[::-1]  # modules() is pre-order: reversed, nested blocks come before their parents


def mixed_precision_policy(precision: str):
    """FSDP2 policy: bf16 weights for compute and fp32 gradient reduction under ``precision: bf16``.

    Inputs are not cast (``cast_forward_inputs=False``): the signed times must stay fp32, since
    bf16 rounds times near ``t = 1`` to multiples of 2**-8 (about 0.004), a large error beside
    the RCGM target's small step (0.01 by default); autocast in the loop chooses each
    operation's precision, as in a one-process run.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def wrap_model(
    model: nn.Module, strategy: str, precision: str = "fp32", device: torch.device | None = None,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Wrap a model (on its device, identical on every process) for ``strategy``.

    * ``none``: the model itself.
    * ``ddp``: ``DistributedDataParallel``; no buffer broadcast (the objective calls the model
      several times per step and the backbones' buffers are constants). Every trainable
      parameter must get a gradient in every backward: modules a family declares gradient-free
      are frozen when the model is built (:func:`twinflow.train.backbone.freeze_modules_without_gradient`),
      so DDP need not search the graph for unused parameters after each backward;
      ``find_unused_parameters`` (``distributed.find_unused_parameters``) turns that search on
      for backbones that need it.
    * ``fsdp``: ``fully_shard`` on every repeated block (:func:`repeated_blocks`), then on the
      root, in place, with :func:`mixed_precision_policy` and ``reshard_after_forward=False``
      (see :func:`gathered_weights`). The parameters become DTensors: build the optimizer after.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"strategy {strategy!r} needs an initialised process group (launch with torchrun)")
    if strategy == "ddp":
        device = device if device is not None else next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        # A buffer broadcast in every forward would be a collective inside the objective, whose
        # number of calls differs between processes; newer torch names the switch differently.
        parallel = nn.parallel.DistributedDataParallel
        switch = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(parallel).parameters else "broadcast_buffers"
        # gradient_as_bucket_view: the gradients live in DDP's reduction buckets instead of beside
        # them, one gradient-sized buffer less (0.8 GB for the Qwen-Image LoRA recipe).
        return parallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=True, **{switch: False},
        )
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:  # FSDP2 is public from torch 2.6
        raise ImportError(f"distributed.strategy 'fsdp' needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}") from error

    device = device if device is not None else next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(precision)
    for block in repeated_blocks(model):
        if any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def wrap_teacher(teacher: EMATeacher, strategy: str, precision: str = "fp32", device: torch.device | None = None) -> EMATeacher:
    """Make the EMA teacher follow the model's sharding (FSDP: shard the copy the same way).

    Call it on a teacher made from the unwrapped model, before :func:`wrap_model` shards that
    model in place. A teacher that is the model itself, or a LoRA model's ``ema`` adapter,
    needs nothing: it is sharded with the model (and
    :meth:`~twinflow.train.lora.AdapterEMATeacher.update` blends the sharded adapters).
    """
    if strategy == "fsdp" and teacher.owns_weights:
        teacher.network = wrap_model(teacher.network, "fsdp", precision, device)
    return teacher


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP2 shards in place: the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _fsdp_modules(*networks: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, so nothing is sharded
        return []

    seen, found = set(), []
    for network in networks:
        for module in network.modules():
            if isinstance(module, FSDPModule) and id(module) not in seen:
                seen.add(id(module))
                found.append(module)
    return found


@contextlib.contextmanager
def gathered_weights(*networks: nn.Module) -> Iterator[None]:
    """Inside: the FSDP networks' full weights are gathered, so forwards need no communication.

    Every process must enter it at the same point (the all-gathers are collectives); inside,
    the processes may call the networks any number of times. On exit the weights are
    resharded. Networks that are not FSDP-sharded are left alone (a no-op for ``none``/``ddp``).
    """
    modules = _fsdp_modules(*networks)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Wrap forward and backward of a micro-step: ``enabled=False`` skips the gradient
    all-reduce / reduce-scatter (every micro-step but the last of an accumulated step)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    modules = _fsdp_modules(model)
    for module in modules:
        module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True)


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """``clip_grad_norm_`` over the model's (possibly sharded) gradients; the norm as a plain tensor,
    the same on every process."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---- checkpoints ------------------------------------------------------------------------------


def save_training_checkpoint(
    context: DistributedContext,
    run_directory: str | Path,
    step: int,
    model: nn.Module,
    teacher: EMATeacher,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict,
    keep_last: int,
    consolidate: bool = True,
) -> Path:
    """Save a training checkpoint under any strategy (every process must call this); see the module notes."""
    states = context.gather(generator.get_state())
    random = {generator_key(rank, context.world_size): value for rank, value in enumerate(states)}
    state = {**state, "distributed": {"strategy": context.strategy, "world_size": context.world_size}}
    temporary = temporary_folder(run_directory, step)
    if context.is_main:
        temporary = start_checkpoint(run_directory, step)
    context.barrier()  # the temporary folder exists before anyone writes into it
    if context.strategy == "fsdp":
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(model, teacher, optimizer), checkpoint_id=temporary / SHARDED_FOLDER)
        weights = _full_state(model, stored_names(model)) if consolidate else None
        ema = _full_state(teacher.network) if consolidate and teacher.owns_weights else None
        checkpoint = Checkpoint(step=step, model=weights, state=state, ema=ema, random=random)
    else:
        checkpoint = Checkpoint(
            step=step, model=model_weights(unwrap(model)), state=state,
            ema=teacher.network.state_dict() if teacher.owns_weights else None,
            optimizer=optimizer.state_dict(), random=random,
        )
    final = checkpoint_folder(run_directory, step)
    if context.is_main:
        final = finish_checkpoint(run_directory, temporary, checkpoint, keep_last)
    context.barrier()  # nobody goes on (or prunes) before the checkpoint is in place
    return final


def load_training_checkpoint(
    context: DistributedContext,
    path: str | Path,
    model: nn.Module,
    teacher: EMATeacher,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[int, dict]:
    """Restore weights, EMA, optimizer and this process's generator from a checkpoint (a run
    folder: its newest); returns ``(step, state)`` for the rest (data order, clock)."""
    folder, state = read_state(path)
    stored = state.get("distributed", {"strategy": "none", "world_size": 1})
    if stored["world_size"] != context.world_size or stored["strategy"] != context.strategy:
        raise ValueError(
            f"checkpoint {folder} was written by {stored['world_size']} process(es) with distributed.strategy="
            f"{stored['strategy']!r}; this run has {context.world_size} with {context.strategy!r}. Resume with the "
            "same number of processes and strategy (the data slices and the per-process random streams depend on them)"
        )
    random = load_file(str(folder / "random.safetensors"))
    generator.set_state(random[generator_key(context.rank, context.world_size)])
    if context.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        from twinflow.train import safe_dcp

        sharded = _sharded_state(model, teacher, optimizer)
        safe_dcp.load(sharded, folder / SHARDED_FOLDER)  # refuses a tampered .metadata or entry
        # A LoRA checkpoint holds the adapters only (dcp.load has checked that it has them all):
        # the frozen base, already loaded from model.path, is "missing" on purpose.
        options = StateDictOptions(strict=stored_names(model) is None)
        set_state_dict(
            model, optimizer, model_state_dict=sharded["model"], optim_state_dict=sharded["optimizer"], options=options
        )
        if teacher.owns_weights:
            set_model_state_dict(teacher.network, sharded["ema"])
    else:
        checkpoint = load_checkpoint(folder, map_location=context.device)
        load_model_weights(unwrap(model), checkpoint.model)
        if teacher.owns_weights:
            if checkpoint.ema is None:
                raise ValueError(f"checkpoint {folder} has no EMA weights but training.ema_decay > 0")
            teacher.network.load_state_dict(checkpoint.ema)
        optimizer.load_state_dict(checkpoint.optimizer)
    teacher.load_state_dict(state["teacher"])
    return int(state.pop("step")), state


def stored_names(model: nn.Module) -> set[str] | None:
    """The model's state-dict entries a checkpoint holds: ``None`` for all of them, or for a LoRA
    model the adapters (``default`` and ``ema``) and a trained ``emb_2`` (:func:`model_weights`).

    Under FSDP the names come from the local shards, so this communicates nothing.
    """
    model = unwrap(model)
    return set(model_weights(model)) if is_lora(model) else None


def _sharded_state(model: nn.Module, teacher: EMATeacher, optimizer: torch.optim.Optimizer) -> dict:
    """DCP state dict: this process's shards of model, optimizer and EMA (same keys on every process).

    A LoRA model's entry holds only the adapters: the frozen base would cost a copy of the
    pretrained weights in every checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer)
    names = stored_names(model)
    if names is not None:
        weights = {name: value for name, value in weights.items() if name in names}
    state = {"model": weights, "optimizer": optimizer_state}
    if teacher.owns_weights:
        state["ema"] = get_model_state_dict(teacher.network)
    return state


def _full_state(network: nn.Module, names: set[str] | None = None) -> dict[str, Tensor]:
    """Full weights on rank 0's CPU (an empty dict elsewhere); a collective.

    ``names``: only these entries (a LoRA model's adapters), gathered one by one in state-dict
    order (the same on every process), so the frozen base is never gathered.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if names is None:
        return get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {}
    for name, value in network.state_dict().items():
        if name not in names:
            continue
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if dist.get_rank() == 0:
            full[name] = value.detach().cpu().clone()
    return full


def _rebuilt_weights(architecture: dict) -> dict[str, Tensor]:
    """A fresh model of ``architecture`` (a LoRA model with its adapters), as a checkpoint holds it:
    the template that DCP loads the shards into."""
    from twinflow.train.backbone import model_from_architecture

    return model_weights(model_from_architecture(architecture))


def export_consolidated(checkpoint: str | Path) -> Path:
    """Write ``model.safetensors`` (and ``ema.safetensors``) of an FSDP checkpoint from its DCP shards.

    Runs in one process without a process group (DCP reshards into full tensors on load), for
    checkpoints saved with ``distributed.consolidate: false``. A LoRA checkpoint gives its
    adapters only, as a one-process LoRA checkpoint has them. Returns the checkpoint folder.
    """
    from twinflow.train import safe_dcp

    folder, state = read_state(checkpoint)
    sharded = folder / SHARDED_FOLDER
    if not sharded.is_dir():
        raise FileNotFoundError(f"checkpoint {folder} has no {SHARDED_FOLDER}/ folder (not an FSDP checkpoint)")
    architecture = state["architecture"]
    stored_keys = safe_dcp.SafeFileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    template = {"model": _rebuilt_weights(architecture)}
    if any(key.startswith("ema.") for key in stored_keys):
        template["ema"] = _rebuilt_weights(architecture)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        safe_dcp.load(template, sharded, no_dist=True)
    for name, weights in template.items():
        partial = folder / f".{name}.safetensors.partial"
        save_file({key: value.contiguous() for key, value in weights.items()}, str(partial))
        os.replace(partial, folder / f"{name}.safetensors")
    return folder


__all__ = [
    "STRATEGIES",
    "DistributedContext",
    "clip_gradients",
    "export_consolidated",
    "gathered_weights",
    "generator_key",
    "gradient_sync",
    "launched_by_torchrun",
    "load_training_checkpoint",
    "mixed_precision_policy",
    "objective_seed",
    "repeated_blocks",
    "save_training_checkpoint",
    "setup_distributed",
    "stored_names",
    "unwrap",
    "wrap_model",
    "wrap_teacher",
]
