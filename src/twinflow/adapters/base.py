"""What every diffusers adapter shares: the time convention, the target-time embedding, the base class.

A TwinFlow backbone is ``F(x_t, t, r, condition)``, the average velocity from time ``t`` to the
target time ``r <= t`` (spec section 1; ``t < 0`` is the fake trajectory). A pretrained
diffusers transformer knows only ``t``. Spec section 4 gives it ``r`` through a second time
embedding ``emb_2``, a copy of its own ``emb``, combined as

    temb = emb(t) + emb_2(r) * (t - r),

so at ``r = t`` the model is exactly the original one. Here ``emb`` is *wrapped*, never the
transformer's ``forward``: :class:`TargetTimeEmbedding` adds the second term to the output of
the module that the unmodified ``forward`` calls, and the adapter hands it ``(t, r)`` just before
each call. The module tree keeps its shape, so the transformer's state dict keeps every original
key and gains only ``<embedding>_2.*`` (the released TwinFlow key names).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "ZERO_TIMES", "TargetTimeEmbedding", "TimeConvention", "TransformerAdapter", "pack_patches", "unpack_patches",
]


ZERO_TIMES = ("reference", "data")
"""Where ``t = 0`` lands on a reversed clock (:attr:`TimeConvention.zero_time`)."""


@dataclass(frozen=True)
class TimeConvention:
    """How one transformer family reads time; every family's scaling and direction live here.

    TwinFlow time ``t`` runs from 1 (noise) to 0 (data) and is negative on the fake trajectory.

    Attributes:
        forward_scale: the transformer's ``forward`` takes ``timestep = forward_scale * t``.
        embedding_scale: its time-embedding module receives ``embedding_scale * t``. (Every family
            here ends up with a sinusoid of ``1000 t``; only where the x1000 happens differs.)
        reversed: the model's own clock runs the other way (Z-Image: 0 is noise, 1 is data). The
            model then sees ``t' = sign(t) * (1 - |t|)`` for both times, the second embedding
            gets ``emb_2((r' - t') * embedding_scale) * |t' - r'|`` and the output is negated.
        absolute_time: feed ``|t'|`` rather than ``t'`` to the first embedding, as the reference
            Z-Image code does; this loses the sign of ``t`` whenever ``r = t``.
        zero_time: what ``sign(0)`` is on a reversed clock, i.e. where ``t = 0`` (in practice the
            one-step target ``r = 0``) lands; ignored on a forward clock, where it must stay
            ``"reference"``. Spec section 5:

            * ``"reference"``: ``torch.sign(0) = 0``, so ``r = 0`` maps to ``r' = 0``, the *noise*
              end of the reversed clock, as the reference code does. Then ``F(z, 1, 0) = F(z, 1, 1)``
              and a ``few``-style call at ``t < 1`` gives ``emb_2`` the argument ``-t' * 1000``
              where every ``r > 0`` gives ``(t - r) * 1000 >= 0``: a jump at ``r = 0``. The
              released TwinFlow-Z-Image weights were trained and are sampled this way, so their
              inference keeps it, bitwise.
            * ``"data"``: zero counts as positive time, ``r = 0`` maps to ``r' = 1`` (the data
              end): continuous in ``r`` at 0, and the one-step target reaches ``emb_2``. The
              convention of models trained here from a base transformer.

            The two agree exactly for every ``t != 0``; the fake trajectory never has ``t = 0``
            or ``r = 0``, so only the real one-step target differs.
    """

    forward_scale: float = 1.0
    embedding_scale: float = 1000.0
    reversed: bool = False
    absolute_time: bool = False
    zero_time: str = "reference"

    def __post_init__(self) -> None:
        if self.zero_time not in ZERO_TIMES:
            raise ValueError(f"zero_time must be one of {list(ZERO_TIMES)}, got {self.zero_time!r}")
        if self.zero_time != "reference" and not self.reversed:
            raise ValueError("zero_time only applies to a reversed clock (Z-Image); this convention has none")

    def model_clock(self, time: Tensor) -> Tensor:
        """``t``, or ``sign(t) * (1 - |t|)`` on a reversed clock, with ``sign(0)`` as
        :attr:`zero_time` says: 0 (``"reference"``, ``torch.sign``) or 1 (``"data"``)."""
        if not self.reversed:
            return time
        if self.zero_time == "data":
            remaining = 1 - time.abs()
            return torch.where(time >= 0, remaining, -remaining)  # -0.0 >= 0 too: the data end
        return torch.sign(time) * (1 - time.abs())

    def model_time(self, time: Tensor) -> Tensor:
        """The ``timestep`` argument of the transformer's ``forward``."""
        clock = self.model_clock(time)
        if self.absolute_time:
            clock = clock.abs()
        return clock if self.forward_scale == 1.0 else clock * self.forward_scale

    def second_embedding_input(self, time: Tensor, target_time: Tensor) -> Tensor:
        """What ``emb_2`` receives: ``r`` (scaled), or ``r' - t'`` (scaled) on a reversed clock."""
        time, target_time = time.double(), target_time.double()
        if self.reversed:
            return (self.model_clock(target_time) - self.model_clock(time)) * self.embedding_scale
        return target_time * self.embedding_scale

    def second_embedding_weight(self, time: Tensor, target_time: Tensor) -> Tensor:
        """The factor on ``emb_2``: the signed ``t - r``, or ``|t' - r'|`` on a reversed clock."""
        if self.reversed:
            return (self.model_clock(time) - self.model_clock(target_time)).abs()
        return time - target_time



class TargetTimeEmbedding:
    """Wraps the transformer's time embedding: ``emb(t, ...) + emb_2(r, ...) * w(t, r)``.

    It sits on ``emb`` as a forward hook: the transformer's unmodified ``forward`` calls ``emb``
    as always, and the hook adds the second term to its output, passing ``emb_2`` the same extra
    arguments (pooled text, guidance, ...) and the times ``(t, r)`` the adapter set for this
    call. The module tree is untouched, so ``state_dict``, ``get_submodule``, ``.to()`` and LoRA
    injection see ``emb`` under its own name and ``emb_2`` as the sibling ``<name>_2``; a deep
    copy of the transformer (an EMA teacher) copies the hook along with both embeddings.
    Without times set (a direct call of the transformer) ``emb`` is returned unchanged.
    """

    def __init__(self, first: nn.Module, second: nn.Module, convention: TimeConvention):
        self.first = first  # emb, the pretrained time embedding
        self.second = second  # emb_2, the target-time embedding
        self.convention = convention
        self.times: tuple[Tensor, Tensor] | None = None  # (t, r) in TwinFlow time, set per call
        self.handle = first.register_forward_hook(self, with_kwargs=True)

    @contextmanager
    def target(self, time: Tensor, target_time: Tensor) -> Iterator[None]:
        """Within the block, calls of ``emb`` add the ``emb_2`` term for ``(t, r)``, shape (B,)."""
        previous, self.times = self.times, (time, target_time)
        try:
            yield
        finally:
            self.times = previous

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, embedding: Tensor | tuple) -> Tensor | tuple:
        if self.times is None:
            return embedding
        if not args:
            raise TypeError(f"{type(module).__name__} must get the timestep as its first positional argument")
        timestep, *rest = args
        time, target_time = self.times
        second_input = self.convention.second_embedding_input(time, target_time)
        second = self.second(second_input.to(timestep.device, timestep.dtype), *rest, **kwargs)
        weight = self.convention.second_embedding_weight(time, target_time)
        if isinstance(embedding, tuple):
            # Sana's AdaLayerNormSingle returns (modulation, embedded timestep); the reference adds
            # the weighted second output to each (its transformer_sana.py).
            return tuple(_add_weighted(first, other, weight) for first, other in zip(embedding, second, strict=True))
        return _add_weighted(embedding, second, weight)


def _add_weighted(embedding: Tensor, second: Tensor, weight: Tensor) -> Tensor:
    """``embedding + second * weight`` (weight per row), summed in float32 (spec section 5 asks
    for it with Z-Image); exact when ``r = t``."""
    term = second.float() * weight.to(second.device, torch.float32).view(-1, *[1] * (second.ndim - 1))
    extra_rows = embedding.shape[0] - term.shape[0]
    if extra_rows > 0:
        # Rows the transformer appended itself (Qwen-Image's zero_cond_t adds a t = 0 copy
        # for reference images): r = t there, so they get no second term.
        term = torch.cat([term, term.new_zeros(extra_rows, *term.shape[1:])])
    return (embedding.float() + term).to(embedding.dtype)


def install_target_time_embedding(
    transformer: nn.Module, name: str, convention: TimeConvention, family: str, notice: bool = True
) -> TargetTimeEmbedding:
    """Give ``transformer`` the second embedding ``<name>_2`` and wrap ``<name>`` (see above).

    A transformer that already registers ``<name>_2`` (e.g. a subclass from the reference code)
    keeps it; otherwise ``emb_2`` starts as a copy of ``emb`` (spec section 4), with a warning
    unless ``notice`` is false (trained weights are about to be loaded).
    """
    first = transformer.get_submodule(name)
    if any(isinstance(hook, TargetTimeEmbedding) for hook in first._forward_hooks.values()):
        raise ValueError(f"this {type(transformer).__name__} already has a TwinFlow adapter")
    second_name = f"{name}_2"
    if second_name in transformer._modules:
        second = transformer.get_submodule(second_name)
    else:
        from twinflow.adapters.quantized import is_quantized, unquantized_copy  # quantized imports this module

        # A GGUF model's emb_2 is a plain float copy (twinflow.adapters.quantized).
        second = unquantized_copy(first) if is_quantized(first) else copy.deepcopy(first)
        transformer.add_module(second_name, second)
        if notice:
            warnings.warn(
                f"{family}: {second_name} (the target-time embedding) is initialised as a copy of "
                f"{name}; load trained TwinFlow weights with load_extra_weights, or train them",
                stacklevel=3,
            )
    return TargetTimeEmbedding(first, second, convention)


class TransformerAdapter(nn.Module):
    """``F(x_t, t, r, condition)`` from a diffusers transformer: a drop-in TwinFlow backbone.

    Subclasses (one per family) set the class attributes and implement
    :meth:`run_transformer`, which packs ``x`` (B, C, H, W) and the condition into the
    transformer's call and unpacks its output; time handling is all in :class:`TimeConvention`.

    Args:
        transformer: the diffusers transformer; it is modified in place (see
            :func:`install_target_time_embedding`) and registered as ``self.transformer``.
        extra_weights: trained ``emb_2`` weights (a safetensors file, a diffusers folder or a
            state dict, see :func:`twinflow.adapters.load_extra_weights`); ``None`` starts
            ``emb_2`` as a copy of ``emb``.
        time_convention: overrides the family's :attr:`default_time_convention`.
        single_time_embedding: the LoRA variant of the reference (spec section 4): no ``emb_2``;
            the model's one embedding receives ``t - r/2`` (TwinFlow time, then the family's
            convention) instead. The state dict then has only the original keys, so the
            adapter has no extra weights; it is no longer the original model at ``r = t``.
    """

    family: ClassVar[str]
    class_names: ClassVar[tuple[str, ...]]  # the diffusers classes this adapter accepts
    embedding_name: ClassVar[str]  # the time-embedding attribute its forward calls
    default_time_convention: ClassVar[TimeConvention]
    condition_keys: ClassVar[tuple[str, ...]]  # required keys of the condition mapping
    optional_condition_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        transformer: nn.Module,
        extra_weights: Any = None,
        *,
        time_convention: TimeConvention | None = None,
        single_time_embedding: bool = False,
    ):
        super().__init__()
        self.check_transformer(transformer)
        self.transformer = transformer
        self.time_convention = time_convention or self.default_time_convention
        self.single_time_embedding = single_time_embedding
        if single_time_embedding:
            if extra_weights is not None:
                raise ValueError(f"{self.family}: an adapter with single_time_embedding has no extra weights to load")
            self.time_embedding = None
            return
        self.time_embedding = install_target_time_embedding(
            transformer, self.embedding_name, self.time_convention, self.family, notice=extra_weights is None
        )
        if extra_weights is not None:
            from twinflow.adapters.weights import load_extra_weights  # weights imports this module

            load_extra_weights(self, extra_weights)

    @classmethod
    def check_transformer(cls, transformer: nn.Module) -> None:
        names = {klass.__name__ for klass in type(transformer).__mro__}
        if not names & set(cls.class_names):
            raise TypeError(
                f"{cls.__name__} adapts {' / '.join(cls.class_names)}, got {type(transformer).__name__}"
            )

    def modules_without_gradient(self) -> list[str]:
        """Modules (names in this adapter) whose parameters never receive a gradient through
        ``F`` (none, or exactly zero): their outputs only reach what the transformer's own
        ``forward`` discards. Training freezes them and LoRA leaves them out: they could never
        learn, weight decay would only shrink them, and DDP then needs no search for unused
        parameters in every backward. None for most families."""
        return []

    def _holding_parameters(self, names: list[str]) -> list[str]:
        """Those of ``names`` that exist in this adapter and hold parameters."""
        present = dict(self.named_modules())
        return [name for name in names if name in present and any(True for _ in present[name].parameters())]

    @property
    def second_embedding_name(self) -> str:
        """The released key prefix of the extra weights: ``time_text_embed_2`` or ``t_embedder_2``."""
        return f"{self.embedding_name}_2"

    @property
    def second_embedding(self) -> nn.Module:
        """``emb_2``, the module that embeds the target time."""
        if self.single_time_embedding:
            raise ValueError(f"this {self.family} adapter uses a single time embedding (t - r/2): it has no emb_2")
        return self.transformer.get_submodule(self.second_embedding_name)

    def forward(self, x: Tensor, time: Tensor, target_time: Tensor, condition: Any = None) -> Tensor:
        """The average velocity ``F`` from ``t`` to ``r``, same shape as ``x`` (B, C, H, W).

        ``time`` and ``target_time`` are ``t`` and ``r`` (scalars or shape (B,), signed: negative
        on the fake trajectory); ``condition`` is the family's mapping of tensors.
        """
        if x.ndim != 4:
            raise ValueError(f"{self.family} adapter expects latents (B, C, H, W), got shape {tuple(x.shape)}")
        time = _batch_time(time, x, "time")
        target_time = _batch_time(target_time, x, "target_time")
        if self.single_time_embedding:
            output = self.run_transformer(x, self.time_convention.model_time(time - target_time / 2), condition)
            return -output if self.time_convention.reversed else output
        with self.time_embedding.target(time, target_time):
            output = self.run_transformer(x, self.time_convention.model_time(time), condition)
        return -output if self.time_convention.reversed else output

    def extra_repr(self) -> str:
        single = ", single_time_embedding=True" if self.single_time_embedding else ""
        return f"family={self.family!r}, time_convention={self.time_convention}{single}"

    def run_transformer(self, x: Tensor, timestep: Tensor, condition: Any) -> Tensor:
        """Call the transformer at its own ``timestep`` and return its output shaped like ``x``."""
        raise NotImplementedError

    def condition_parts(self, condition: Any) -> dict[str, Tensor | None]:
        """The condition's tensors by key (missing optional keys are ``None``); checks the keys."""
        optional = self.optional_condition_keys
        if not isinstance(condition, Mapping) or not set(self.condition_keys) <= set(condition):
            keys = sorted(condition) if isinstance(condition, Mapping) else type(condition).__name__
            raise ValueError(
                f"{self.family} condition must be a mapping with keys {list(self.condition_keys)}"
                f" (optional: {list(optional)}), got {keys}"
            )
        unknown = sorted(set(condition) - set(self.condition_keys) - set(optional))
        if unknown:
            raise ValueError(f"{self.family} condition has unknown keys {unknown}")
        return {key: condition.get(key) for key in (*self.condition_keys, *optional)}


def _batch_time(time: Tensor | float, x: Tensor, name: str) -> Tensor:
    """A time as a float tensor of shape (B,) on ``x``'s device."""
    time = torch.as_tensor(time, device=x.device)
    if not time.is_floating_point():
        time = time.float()
    if time.ndim == 0:
        time = time.expand(x.shape[0])
    if time.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a scalar or have shape ({x.shape[0]},), got {tuple(time.shape)}")
    return time


def pack_patches(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p), the token layout of Qwen-Image and Flux
    (diffusers' ``_pack_latents`` with ``p = 2``)."""
    batch, channels, height, width = x.shape
    if height % patch or width % patch:
        raise ValueError(f"latent height and width must be multiples of {patch}, got {height} x {width}")
    x = x.reshape(batch, channels, height // patch, patch, width // patch, patch)
    tokens = (height // patch) * (width // patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, tokens, channels * patch * patch)


def unpack_patches(tokens: Tensor, height: int, width: int, patch: int) -> Tensor:
    """The inverse of :func:`pack_patches`: (B, H/p * W/p, C * p * p) -> (B, C, H, W)."""
    batch, _, features = tokens.shape
    channels = features // (patch * patch)
    tokens = tokens.reshape(batch, height // patch, width // patch, channels, patch, patch)
    return tokens.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)
