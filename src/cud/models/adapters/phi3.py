"""Phi-3 (and Phi-3.5 / Phi-4-mini, model_type ``phi3``): the Llama layout (RMSNorm, rotary,
gated SiLU MLP, grouped-query attention) with two fused projections, ``qkv_proj`` (rows: all
query heads, then the key/value heads' keys, then their values) and ``gate_up_proj`` (gate
half, then up half); rotary may be partial (``partial_rotary_factor``: the first
``head_dim * factor`` dimensions of each head rotate, the rest pass through) and may be
``longrope`` (the model's own rotary module gives the tables); with ``config.sliding_window``
set, every layer attends within that window.

Nodes are the Llama family's: ``input`` is the token embedding, ``a{l}.h{h}`` head h's slice of
``o_proj`` (no bias), ``m{l}`` the fused MLP after ``post_attention_layernorm``. Keys and values
are ungrouped: each query head has its own k and v inputs in the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from cud.models.adapters.base import AttentionContext
from cud.models.adapters.qwen3 import WideNormLlamaAdapter


class Phi3Adapter(WideNormLlamaAdapter):
    family = "phi3"
    model_types = ("phi3",)

    def qkv_weights(self, layer: int):
        qkv = self.layers[layer].self_attn.qkv_proj
        h, kv, e, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        w_q, w_k, w_v = qkv.weight.split([h * e, kv * e, kv * e])
        group = h // kv
        weight = torch.stack([w_q.view(h, e, d),
                              w_k.view(kv, e, d).repeat_interleave(group, 0),
                              w_v.view(kv, e, d).repeat_interleave(group, 0)]).transpose(2, 3)
        if qkv.bias is None:
            return weight, None
        b_q, b_k, b_v = qkv.bias.split([h * e, kv * e, kv * e])
        bias = torch.stack([b_q.view(h, e), b_k.view(kv, e).repeat_interleave(group, 0),
                            b_v.view(kv, e).repeat_interleave(group, 0)])
        return weight, bias

    def project_qkv(self, layer: int, y: Tensor):
        b, t, _ = y.shape
        h, kv, e = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.layers[layer].self_attn.qkv_proj(y).split([h * e, kv * e, kv * e], -1)
        # grouped keys and values computed once per group, then one copy per query head
        return (q.view(b, t, h, e), k.view(b, t, kv, e).repeat_interleave(h // kv, 2),
                v.view(b, t, kv, e).repeat_interleave(h // kv, 2))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        cos, sin = ctx.rotary
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # rotates the first cos.shape[-1] dims
        mask = ctx.sliding_mask if ctx.sliding_mask is not None and layer in self.sliding_layers \
            else ctx.mask
        return self._sdpa(q, k, v, mask, scale=self.head_dim ** -0.5)
