"""Phi-1 / Phi-1.5 / Phi-2 (model_type ``phi``): a parallel block in which attention and MLP both
read the output of the layer's one ``input_layernorm`` (a LayerNorm) and are added to the
residual together, ``x + attn(ln(x)) + mlp(ln(x))``; separate q/k/v Linear projections with
biases (grouped keys/values when ``num_key_value_heads`` < heads); partial rotary (the first
``head_dim * partial_rotary_factor`` dimensions of each head rotate, the rest pass through);
optionally ``qk_layernorm``, a LayerNorm over the head dimension on q and on k (weights shared by
the heads) before rotary; the output projection ``dense`` with a bias; a GELU MLP ``fc1``/``fc2``
with biases; ``final_layernorm`` and an ``lm_head`` with a bias.

Nodes: ``input`` is the token embedding (no position embedding: rotary), ``a{l}.h{h}`` head h's
slice of ``dense`` (its bias is a constant of the stream, added by the runner), ``m{l}`` the MLP.
The block is parallel, as GPT-NeoX's (``parallel_attn_mlp``): the MLP of layer l reads the
residual *before* layer l's attention, so there are no edges from a layer's heads to its MLP.
The one shared ``input_layernorm`` belongs to every reader of the layer: each head's q, k, v
input and the MLP input apply it separately to their own (possibly patched) residual, which in
the unpatched model are the same stream, so the norm's output is the one HF computes once
(TransformerLens likewise configures Phi with ``parallel_attn_mlp``). q/k LayerNorms and rotary
live inside :meth:`attend`: a head's q and k inputs are its projections of the normalised stream.

Subclasses the Llama adapter for what is the same (module names ``model.layers[l].self_attn``
``q_proj``/``k_proj``/``v_proj``, their layout, the rotary tables, ``input_layernorm`` as the
attention norm); everything else is overridden here.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

from cud.models.adapters.base import AttentionContext, ReaderNorm
from cud.models.adapters.llama import LlamaAdapter


class PhiAdapter(LlamaAdapter):
    family = "phi"
    model_types = ("phi",)
    parallel_attn_mlp = True

    def __init__(self, model):
        super().__init__(model)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.rotary_ndims = attn.rotary_ndims

    def reader_norm(self, layer: int) -> ReaderNorm:
        return ReaderNorm.of_layer_norm(self.layers[layer].input_layernorm)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        attn = self.layers[layer].self_attn
        if attn.qk_layernorm:
            q, k = attn.q_layernorm(q), attn.k_layernorm(k)
        cos, sin = ctx.rotary
        r = self.rotary_ndims
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
        q = torch.cat((q_rot, q[..., r:]), dim=-1)
        k = torch.cat((k_rot, k[..., r:]), dim=-1)
        return self._sdpa(q, k, v, ctx.mask, scale=self.head_dim ** -0.5)

    def output_weight(self, layer: int) -> Tensor:
        dense = self.layers[layer].self_attn.dense
        return dense.weight.view(self.d_model, self.n_heads, self.head_dim).permute(1, 2, 0)

    def attention_bias(self, layer: int):
        return self.layers[layer].self_attn.dense.bias

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        return block.mlp(block.input_layernorm(x))  # the norm the layer's attention reads too

    def unembed(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self.backbone.final_layernorm(x))
