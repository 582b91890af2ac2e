"""GPT-NeoX (Pythia): LayerNorm, fused per-head q/k/v, partial rotary, and by default a parallel
residual (the MLP reads the stream *before* its layer's attention, so it has no edges from it)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from cud.models.adapters.base import AttentionContext, ReaderNorm, ResidualAdapter


class GPTNeoXAdapter(ResidualAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.backbone = model.gpt_neox
        self.layers = self.backbone.layers
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.d_model = cfg.hidden_size
        self.head_dim = self.d_model // self.n_heads
        self.parallel_attn_mlp = bool(cfg.use_parallel_residual)

    def rotary(self, seq_len, device):
        positions = torch.arange(seq_len, device=device)[None]
        probe = self.backbone.embed_in.weight[:1, None, :].expand(1, seq_len, -1)
        return self.backbone.rotary_emb(probe, positions)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.backbone.embed_in(input_ids)

    def attention_norm(self, layer: int):
        return self.layers[layer].input_layernorm

    def reader_norm(self, layer: int) -> ReaderNorm:
        return ReaderNorm.of_layer_norm(self.layers[layer].input_layernorm)

    def qkv_weights(self, layer: int):
        qkv = self.layers[layer].attention.query_key_value
        h, e, d = self.n_heads, self.head_dim, self.d_model
        # Output rows of query_key_value are laid out (head, [q|k|v], e).
        weight = qkv.weight.view(h, 3, e, d).permute(1, 0, 3, 2)  # (3, H, d, e)
        bias = qkv.bias.view(h, 3, e).transpose(0, 1) if qkv.bias is not None else None
        return weight, bias

    def project_qkv(self, layer: int, y: Tensor):
        b, t, _ = y.shape
        qkv = self.layers[layer].attention.query_key_value(y)
        return qkv.view(b, t, self.n_heads, 3, self.head_dim).unbind(3)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        cos, sin = ctx.rotary
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return self._sdpa(q, k, v, ctx.mask, scale=self.head_dim ** -0.5)

    def output_weight(self, layer: int) -> Tensor:
        dense = self.layers[layer].attention.dense
        return dense.weight.view(self.d_model, self.n_heads, self.head_dim).permute(1, 2, 0)

    def attention_bias(self, layer: int):
        return self.layers[layer].attention.dense.bias

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        return block.mlp(block.post_attention_layernorm(x))

    def unembed(self, x: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(self.backbone.final_layer_norm(x))
