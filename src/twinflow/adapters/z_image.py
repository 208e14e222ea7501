"""Z-Image(-Turbo) (``ZImageTransformer2DModel``) as a TwinFlow backbone (spec section 5).

diffusers 0.42 facts this relies on:

* ``forward(x, t, cap_feats, ...)`` takes *lists*: one latent (C, F, H, W) per sample (images
  have F = 1) and one caption embedding (L_i, D) per sample without padding; it returns a list
  of (C, F, H, W);
* it calls ``self.t_embedder(t * self.t_scale)`` (``t_scale`` = 1000 in the config);
* its clock is reversed: ``ZImagePipeline`` passes ``t' = 1 - sigma`` (0 = noise, 1 = data) and
  negates the output to get the flow-matching velocity.

TwinFlow time therefore enters as ``t' = sign(t) * (1 - |t|)`` for both times, and the output is
negated. The released TwinFlow-Z-Image weights add ``t_embedder_2.*`` (a second
``TimestepEmbedder``): ``t_emb = t_embedder(1000 t') + t_embedder_2(1000 (r' - t')) * |t' - r'|``.

Two places where the reference code is not tidy maths, both in
:class:`~twinflow.adapters.base.TimeConvention`:

* **The target time r = 0** (``zero_time``). ``torch.sign(0) = 0`` maps ``r = 0`` (the one-step
  target) to ``r' = 0``, the *noise* end of the reversed clock: ``F(z, 1, 0) = F(z, 1, 1)`` (no
  target-time signal on the one-step slice) and a ``few``-style sampler call at ``t < 1`` hands
  ``t_embedder_2`` the argument ``-1000 t'``, where every ``r > 0`` gives ``1000 (t - r) >= 0``.
  The released TwinFlow-Z-Image checkpoints are sampled that way by the reference code, so they
  keep it bitwise (``zero_time="reference"``). A model trained here from a base Z-Image
  transformer uses ``zero_time="data"`` instead: zero counts as positive time, ``r' = 1`` (the
  data end), continuous in ``r``. The two agree for every ``t, r != 0``; the fake trajectory never
  has ``t = 0``, so only the real one-step target differs. The choice belongs to the weights:
  :func:`~twinflow.adapters.load_adapter` takes it from the folder's ``twinflow.json`` (an export
  of this project), else from whether the folder already holds ``t_embedder_2`` (a released
  checkpoint: ``reference``) or not (a base model: ``data``); training checkpoints record it
  as ``model.z_image_zero_time`` in their architecture (:class:`~twinflow.models.DiffusersConfig`).
* **The sign of t** (``absolute_time``). The reference feeds ``|t'|`` to the first embedding,
  which hides the sign of ``t`` whenever ``r = t`` (the fake slice of the objective); by default
  the signed ``t'`` is used instead (spec section 1: every backbone must see the sign), and
  ``absolute_time=True`` restores the reference. The two agree for ``t >= 0``, which is all
  sampling uses.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from twinflow.adapters.base import ZERO_TIMES, TimeConvention, TransformerAdapter

Z_IMAGE_TIME = TimeConvention(forward_scale=1.0, embedding_scale=1000.0, reversed=True)
"""Z-Image takes ``t'`` in [0, 1] on a reversed clock and scales by ``t_scale`` (1000) itself;
``r = 0`` as the released checkpoints read it (``zero_time="reference"``, see the module notes)."""


def resolve_zero_time(zero_time: str, trained_second_embedding: bool) -> str:
    """``zero_time`` of a Z-Image adapter: ``auto`` is ``reference`` for trained ``t_embedder_2``
    weights of unknown origin (the released checkpoints' format) and ``data`` for a model whose
    ``t_embedder_2`` starts as a copy of ``t_embedder`` (a new model, trained here)."""
    if zero_time == "auto":
        return "reference" if trained_second_embedding else "data"
    if zero_time not in ZERO_TIMES:
        raise ValueError(f"z_image zero_time must be 'auto' or one of {list(ZERO_TIMES)}, got {zero_time!r}")
    return zero_time


class ZImageAdapter(TransformerAdapter):
    """``F(x_t, t, r, condition)`` for Z-Image.

    ``x``: latents (B, C, H, W), H and W multiples of the patch size (2). ``condition``:
    ``{"prompt_embeds": (B, L, D), "prompt_embeds_mask": (B, L), optional}``; each sample's
    caption is its unmasked rows (at least one).

    Args:
        absolute_time: feed ``|t'|`` to the first embedding, as the reference code does (see the
            module notes); the default keeps the sign.
        zero_time: where the target time ``r = 0`` lands on the reversed clock: ``reference``
            (the released checkpoints), ``data`` (continuous at 0; models trained here) or
            ``auto`` (:func:`resolve_zero_time`: ``reference`` with ``extra_weights``, ``data``
            without). A model must be sampled with the convention it was trained with.
    """

    family = "z_image"
    class_names = ("ZImageTransformer2DModel",)
    embedding_name = "t_embedder"
    default_time_convention = Z_IMAGE_TIME
    condition_keys = ("prompt_embeds",)
    optional_condition_keys = ("prompt_embeds_mask",)

    def __init__(
        self, transformer: nn.Module, extra_weights: Any = None, *, absolute_time: bool = False,
        single_time_embedding: bool = False, zero_time: str = "auto",
    ):
        self.check_transformer(transformer)
        convention = replace(
            Z_IMAGE_TIME, embedding_scale=float(transformer.config.t_scale), absolute_time=absolute_time,
            zero_time=resolve_zero_time(zero_time, extra_weights is not None),
        )
        super().__init__(transformer, extra_weights, time_convention=convention, single_time_embedding=single_time_embedding)

    def run_transformer(self, x: Tensor, timestep: Tensor, condition: Any) -> Tensor:
        parts = self.condition_parts(condition)
        embeds, mask = parts["prompt_embeds"], parts["prompt_embeds_mask"]
        if mask is None:
            captions = list(embeds.unbind(0))
        else:
            mask = mask.bool()
            if not bool(mask.any(dim=1).all()):
                raise ValueError("every Z-Image caption needs at least one unmasked token")
            captions = [embed[keep] for embed, keep in zip(embeds, mask)]
        latents = list(x.unsqueeze(2).unbind(0))  # (C, 1, H, W) per sample
        outputs = self.transformer(latents, timestep, captions, return_dict=False)[0]
        return torch.stack(outputs).squeeze(2)
