"""Gemma 3 text models (model_type ``gemma3_text``, ``Gemma3ForCausalLM``): the Gemma 2 block
(scaled embeddings, ``(1 + w)`` RMSNorms before and after attention and MLP, GeGLU,
``query_pre_attn_scalar``, grouped-query attention ungrouped per query head, tied unembedding,
sliding-window layers from ``config.layer_types``, five local layers to one global in the
released models) plus

- a per-head RMSNorm ``(1 + w)`` on q (``q_norm``) and on k (``k_norm``) over the head
  dimension, after the projection and before rotary (as in Qwen3, weights shared by the heads);
- rotary tables per layer type: the sliding (local) layers use their own base
  (``rope_parameters["sliding_attention"]``, 10 000 in the released models), the full (global)
  layers theirs (``rope_parameters["full_attention"]``, 1 000 000, possibly scaled);
- no soft-capping by default. ``final_logit_softcapping`` is applied when set; HF's Gemma 3
  attention does not pass ``attn_logit_softcapping`` to its attention function (transformers
  5.x), so a config that sets it is computed without it, by HF and by this adapter alike.

Nodes are Gemma 2's (:mod:`cud.models.adapters.gemma2`): ``input`` the scaled embedding, ``m{l}``
the MLP after ``post_feedforward_layernorm``, a head its share ``(1 + w) * o_h / r`` of the
post-attention norm of the layer's summed head outputs (see
:class:`~cud.models.adapters.olmo2.PostNormHeads`). q_norm and k_norm act within a head, so a
head's q, k, v inputs are its projections of the ``input_layernorm`` stream and the shared
capture is exact, as for Qwen3. Bidirectional (embedding) Gemma 3 models are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cud.models.adapters.base import AttentionContext
from cud.models.adapters.gemma2 import Gemma2Adapter


@dataclass
class Gemma3Context(AttentionContext):
    """Gemma 3's attention context: ``rotary`` holds the global layers' tables, ``local_rotary``
    the sliding layers'."""

    local_rotary: tuple[Tensor, Tensor] | None = None


class Gemma3TextAdapter(Gemma2Adapter):
    family = "gemma3_text"
    model_types = ("gemma3_text",)

    def __init__(self, model):
        super().__init__(model)
        self.attn_cap = None  # HF's Gemma 3 attention ignores attn_logit_softcapping
        layer_types = getattr(model.config, "layer_types", None) or []
        #: layers with the local rotary base (whatever their window)
        self.local_layers = frozenset(i for i, kind in enumerate(layer_types)
                                      if kind == "sliding_attention")

    def rotary(self, seq_len, device, layer_type: str = "full_attention"):
        emb = self.backbone.embed_tokens.weight
        positions = torch.arange(seq_len, device=device)[None]
        return self.backbone.rotary_emb(emb[:1, None, :].expand(1, seq_len, -1), positions,
                                        layer_type)

    def context(self, attention_mask: Tensor) -> Gemma3Context:
        ctx = super().context(attention_mask)
        local = self.rotary(attention_mask.shape[1], attention_mask.device, "sliding_attention") \
            if self.local_layers else None
        return Gemma3Context(mask=ctx.mask, rotary=ctx.rotary, sliding_mask=ctx.sliding_mask,
                             local_rotary=local)

    def _rotary(self, layer: int, ctx: AttentionContext) -> tuple[Tensor, Tensor]:
        if layer in self.local_layers:
            return ctx.local_rotary
        return ctx.rotary

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        attn = self.layers[layer].self_attn
        # per-head (1 + w) RMSNorm over e, weights shared across heads: q, k (B, H, T, e)
        q, k = self._norm(attn.q_norm)(q), self._norm(attn.k_norm)(k)
        return super().attend(layer, q, k, v, ctx)
