"""Sana (``SanaTransformer2DModel``) as a TwinFlow backbone (spec section 5).

diffusers 0.42 facts this relies on:

* ``forward(hidden_states, encoder_hidden_states, timestep, guidance=None,
  encoder_attention_mask=None, ...)`` takes latents (B, C, H, W) directly (``patch_size`` 1 for
  the released models) and calls ``self.time_embed(timestep, batch_size=..., hidden_dtype=...)``,
  or ``self.time_embed(timestep, guidance=..., hidden_dtype=...)`` when the model has
  ``guidance_embeds``;
* ``time_embed`` is an ``AdaLayerNormSingle`` (or ``SanaCombinedTimestepGuidanceEmbeddings``)
  and returns a *tuple*: the block modulation (B, 6D) and the embedded timestep (B, D) that the
  output norm takes. It does not scale: ``SanaPipeline`` passes the scheduler's
  ``timestep = 1000 * sigma`` times ``config.timestep_scale`` (1 for the flow-matching models),
  and the model predicts the flow velocity ``noise - data``. So the adapter passes ``1000 t``,
  ``emb_2`` gets ``1000 r``, and both outputs get the second term:
  ``(mod, emb) = time_embed(1000 t) + time_embed_2(1000 r) * (t - r)``, element by element, as
  the reference's ``transformer_sana.py`` does.

The reference (OpenUni's Sana 1.6B) names the extra module ``time_embed_2`` and initialises it
randomly (normal, std 0.02); here it starts as a copy of ``time_embed`` (exactly the base model
at ``r = t``, spec section 4), and the reference's trained ``time_embed_2.*`` weights load
as they are. SANA-Sprint (``timestep_scale`` != 1) is a TrigFlow model, not a flow-matching one:
it is refused.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from twinflow.adapters.base import TimeConvention, TransformerAdapter

SANA_TIME = TimeConvention(forward_scale=1000.0, embedding_scale=1000.0)
"""Sana takes ``1000 t`` and its time embedding does not scale again."""


class SanaAdapter(TransformerAdapter):
    """``F(x_t, t, r, condition)`` for Sana.

    ``x``: latents (B, C, H, W). ``condition``: ``{"prompt_embeds": (B, L, D),
    "prompt_embeds_mask": (B, L), optional}``, as ``SanaPipeline.encode_prompt`` returns them,
    plus ``"guidance"`` (B,) for a transformer with ``guidance_embeds``.
    """

    family = "sana"
    class_names = ("SanaTransformer2DModel",)
    embedding_name = "time_embed"
    default_time_convention = SANA_TIME
    condition_keys = ("prompt_embeds",)
    optional_condition_keys = ("prompt_embeds_mask", "guidance")

    @classmethod
    def check_transformer(cls, transformer: nn.Module) -> None:
        super().check_transformer(transformer)
        scale = float(getattr(transformer.config, "timestep_scale", 1.0))
        if scale != 1.0:
            raise ValueError(
                f"this SanaTransformer2DModel has timestep_scale {scale} (SANA-Sprint, a TrigFlow model); "
                "TwinFlow adapts the flow-matching Sana models (timestep_scale 1)"
            )

    def run_transformer(self, x: Tensor, timestep: Tensor, condition: Any) -> Tensor:
        parts = self.condition_parts(condition)
        guided = bool(getattr(self.transformer.config, "guidance_embeds", False))
        if guided != (parts["guidance"] is not None):
            raise ValueError(
                "this Sana transformer has guidance_embeds: its condition needs 'guidance' (B,)" if guided
                else "'guidance' is only for a Sana transformer with guidance_embeds"
            )
        output = self.transformer(
            hidden_states=x,
            encoder_hidden_states=parts["prompt_embeds"],
            encoder_attention_mask=parts["prompt_embeds_mask"],
            timestep=timestep,
            guidance=parts["guidance"],
            return_dict=False,
        )[0]
        if output.shape[1] == 2 * x.shape[1]:  # learned sigma, as SanaPipeline drops it
            output = output[:, : x.shape[1]]
        return output
