"""GPT-2: learned position embeddings, LayerNorm, fused Conv1D q/k/v projection, GELU MLP."""

from __future__ import annotations

import torch
from torch import Tensor

from cud.models.adapters.base import AttentionContext, ReaderNorm, ResidualAdapter


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
        return self.embed_tokens(input_ids) + self.position_embedding(input_ids)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.backbone.wte(input_ids)

    def position_embedding(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.backbone.wpe(positions)[None]

    def attention_norm(self, layer: int):
        return self.layers[layer].ln_1

    def reader_norm(self, layer: int) -> ReaderNorm:
        return ReaderNorm.of_layer_norm(self.layers[layer].ln_1)

    def qkv_weights(self, layer: int):
        attn = self.layers[layer].attn
        h, e, d = self.n_heads, self.head_dim, self.d_model
        # Conv1D stores weight as (in, out); columns are [q | k | v], each split by head.
        weight = attn.c_attn.weight.view(d, 3, h, e).permute(1, 2, 0, 3)  # (3, H, d, e)
        return weight, attn.c_attn.bias.view(3, h, e)

    def project_qkv(self, layer: int, y: Tensor):
        b, t, _ = y.shape
        qkv = self.layers[layer].attn.c_attn(y).view(b, t, 3, self.n_heads, self.head_dim)
        return qkv.unbind(2)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        attn = self.layers[layer].attn
        scale = 1.0
        if getattr(attn, "scale_attn_weights", True):
            scale /= self.head_dim ** 0.5
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer + 1)
        return self._sdpa(q, k, v, ctx.mask, scale=scale)

    def output_weight(self, layer: int) -> Tensor:
        return self.layers[layer].attn.c_proj.weight.view(self.n_heads, self.head_dim, self.d_model)

    def attention_bias(self, layer: int):
        return self.layers[layer].attn.c_proj.bias

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        return block.mlp(block.ln_2(x))

    def unembed(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self.backbone.ln_f(x))
