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
  per rank: :func:`twinflow.train.checkpoint.generator_key`), so a resume continues every
  stream; it needs the same number of processes.
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
  gradients. Checkpoints hold the adapters only (:func:`twinflow.train.checkpoint.stored_names`),
  sharded and consolidated alike; the base comes from ``model.path`` again.
* **FSDP and the objective's network calls.** The objective's number of no-gradient calls
  depends on each process's random times (e.g. the guidance call is skipped when no time falls
  in the guidance range), while every FSDP forward is a collective all-gather. So the model and
  the teacher are sharded with ``reshard_after_forward=False`` and all-gathered once, in the same
  order on every process, before the objective runs (:func:`gathered_weights`); the forwards then
  communicate nothing and the processes may call the networks different numbers of times. The
  weights are resharded after the objective; the backward gathers block by block as usual. The
  price: the full (bf16 with ``precision: bf16``) weights of model and teacher live on every
  device during the objective; gradients and optimizer state stay sharded.
* **Checkpoints.** :mod:`twinflow.train.checkpoint` saves and loads them under every strategy
  (the DCP shards of ``fsdp``, their consolidation, ``export_consolidated``); this module holds
  only the runtime: the process group, the wrapping, the gathering, the gradient synchronisation.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from twinflow.devices import resolve_device
from twinflow.teacher import EMATeacher
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


__all__ = [
    "STRATEGIES",
    "DistributedContext",
    "clip_gradients",
    "gathered_weights",
    "gradient_sync",
    "launched_by_torchrun",
    "mixed_precision_policy",
    "objective_seed",
    "repeated_blocks",
    "setup_distributed",
    "unwrap",
    "wrap_model",
    "wrap_teacher",
]
