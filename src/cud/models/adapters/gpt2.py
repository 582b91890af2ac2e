"""GPT-2: learned position embeddings, LayerNorm, fused Conv1D q/k/v projection, GELU MLP."""

from __future__ import annotations

import torch
from torch import Tensor

from cud.models.adapters.base import AttentionContext, ResidualAdapter


class GPT2Adapter(ResidualAdapter):
    family = "gpt2"
    model_types = ("gpt2",)

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.backbone = model.transformer
        self.layers = self.backbone.h
        self.n_layers = cfg.n_layer
        self.n_heads = cfg.n_head
        self.d_model = cfg.n_embd
        self.head_dim = self.d_model // self.n_heads

    def embed(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.backbone.wte(input_ids) + self.backbone.wpe(positions)[None]

    def attention_heads(self, layer: int, x: Tensor, ctx: AttentionContext) -> Tensor:
        block = self.layers[layer]
        attn = block.attn
        xn = block.ln_1(x)
        h, e, d = self.n_heads, self.head_dim, self.d_model
        # Conv1D stores weight as (in, out); columns are [q | k | v], each split by head.
        w = attn.c_attn.weight.view(d, 3, h, e).permute(1, 2, 0, 3)  # (3, H, d, e)
        b = attn.c_attn.bias.view(3, h, e)
        q = self._project_heads(xn[:, :, 0], w[0], b[0])
        k = self._project_heads(xn[:, :, 1], w[1], b[1])
        v = self._project_heads(xn[:, :, 2], w[2], b[2])
        scale = 1.0
        if getattr(attn, "scale_attn_weights", True):
            scale /= e ** 0.5
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer + 1)
        o = self._attend(q, k, v, ctx, scale=scale)
        w_out = attn.c_proj.weight.view(h, e, d)
        return self._heads_out(o, w_out)

    def attention_bias(self, layer: int):
        return self.layers[layer].attn.c_proj.bias

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        return block.mlp(block.ln_2(x))

    def unembed(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self.backbone.ln_f(x))
