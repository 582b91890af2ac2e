"""Gemma 2 (model_type ``gemma2``): Gemma's pieces (token embeddings times sqrt(hidden_size) in
the model's dtype, RMSNorms computing ``x_hat * (1 + w)``, a GeGLU MLP, ``head_dim`` decoupled
from ``hidden_size / heads``, grouped-query attention ungrouped per query head, the unembedding
tied to the embedding) in a block with norms before *and after* each sublayer,

    h = x + post_attention_layernorm(o_proj(attn(input_layernorm(x)))),
    out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))),

and attention scores scaled by ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``),
soft-capped as ``cap * tanh(scores / cap)`` (``attn_logit_softcapping``) before the mask,
sliding-window attention on the layers ``config.layer_types`` marks ``sliding_attention``
(every other layer, starting with layer 0, in the released models), and the final logits
soft-capped the same way (``final_logit_softcapping``).

Nodes: ``input`` is the scaled embedding (as for Gemma); ``m{l}`` is the MLP's output after
``post_feedforward_layernorm``; a head ``a{l}.h{h}`` is its share ``(1 + w) * o_h / r`` of the
post-attention norm of the layer's summed head outputs (``o_h`` its slice of ``o_proj``, ``r``
the RMS of the sum), the definition :class:`~cud.models.adapters.olmo2.PostNormHeads` gives
every post-norm family: the heads' outputs add up to what enters the stream, so readers still
read sums of node outputs and patching, attribution and brute force agree exactly; removing a
head subtracts its share (the norm's scale, computed from all of the layer's heads in the run,
couples them). The attention input norm ``input_layernorm`` is a reader norm as in the
pre-norm families, so the shared capture applies: a head's q/k/v gradient in the shared pass
is its own (the post-norm acts on the sum of heads, each head's raw output depends on its own
inputs only). Configs with an ``o_proj`` bias (inside the post-norm, no head's) are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cud.models.adapters.base import AttentionContext
from cud.models.adapters.gemma import GemmaAdapter
from cud.models.adapters.olmo2 import PostNormHeads
from cud.models.adapters.qwen3 import WideRMSNorm


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(x / cap)``, or x when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Gemma2Adapter(PostNormHeads, GemmaAdapter):
    family = "gemma2"
    model_types = ("gemma2",)

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.attn_cap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_cap = getattr(cfg, "final_logit_softcapping", None)

    def post_attention_norm(self, layer: int) -> WideRMSNorm:
        return self._norm(self.layers[layer].post_attention_layernorm)

    def _mask(self, layer: int, ctx: AttentionContext) -> Tensor:
        if ctx.sliding_mask is not None and layer in self.sliding_layers:
            return ctx.sliding_mask
        return ctx.mask

    def _rotary(self, layer: int, ctx: AttentionContext) -> tuple[Tensor, Tensor]:
        return ctx.rotary

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        cos, sin = self._rotary(layer, ctx)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = soft_cap((q @ k.transpose(-1, -2)) * self.scale, self.attn_cap)
        scores = scores.masked_fill(~self._mask(layer, ctx), torch.finfo(scores.dtype).min)
        # softmax in float32 (float64 in a float64 model), as HF's eager attention
        weights = torch.softmax(scores, -1, dtype=torch.promote_types(q.dtype, torch.float32))
        return weights.to(v.dtype) @ v

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        y = block.mlp(self._norm(block.pre_feedforward_layernorm)(x))
        return self._norm(block.post_feedforward_layernorm)(y)

    def unembed(self, x: Tensor) -> Tensor:
        return soft_cap(super().unembed(x), self.final_cap)
