"""Llama family: Llama 2/3, Mistral, Qwen2, SmolLM2 (RMSNorm, rotary, gated MLP, grouped-query
attention). Keys and values are computed per *query* head ("ungrouped"), so each query head has
its own k and v inputs in the graph, as in the reference setup."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cud.models.adapters.base import AttentionContext, ResidualAdapter


class LlamaAdapter(ResidualAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.backbone = model.model
        self.layers = self.backbone.layers
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_model = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads

        self.window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)
        if not self.window:
            self.sliding_layers = frozenset()
        elif layer_types:
            self.sliding_layers = frozenset(i for i, kind in enumerate(layer_types)
                                            if kind == "sliding_attention")
        elif cfg.model_type == "qwen2":
            first = getattr(cfg, "max_window_layers", self.n_layers)
            self.sliding_layers = frozenset(range(first, self.n_layers)) \
                if getattr(cfg, "use_sliding_window", False) else frozenset()
        else:  # Mistral: every layer
            self.sliding_layers = frozenset(range(self.n_layers))

    def context(self, attention_mask: Tensor) -> AttentionContext:
        ctx = super().context(attention_mask)
        t = attention_mask.shape[1]
        if self.sliding_layers and t > self.window:
            pos = torch.arange(t, device=attention_mask.device)
            near = (pos[:, None] - pos[None, :]) < self.window  # query i sees key j > i - window
            ctx.sliding_mask = ctx.mask & near[None, None]
        return ctx

    def rotary(self, seq_len, device):
        emb = self.backbone.embed_tokens.weight
        positions = torch.arange(seq_len, device=device)[None]
        cos, sin = self.backbone.rotary_emb(emb[:1, None, :].expand(1, seq_len, -1), positions)
        return cos, sin

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.backbone.embed_tokens(input_ids)

    def _qkv_weights(self, attn):
        h, kv, e, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        group = h // kv
        wq = attn.q_proj.weight.view(h, e, d).transpose(1, 2)
        wk = attn.k_proj.weight.view(kv, e, d).repeat_interleave(group, 0).transpose(1, 2)
        wv = attn.v_proj.weight.view(kv, e, d).repeat_interleave(group, 0).transpose(1, 2)
        bq = attn.q_proj.bias.view(h, e) if attn.q_proj.bias is not None else None
        bk = attn.k_proj.bias.view(kv, e).repeat_interleave(group, 0) \
            if attn.k_proj.bias is not None else None
        bv = attn.v_proj.bias.view(kv, e).repeat_interleave(group, 0) \
            if attn.v_proj.bias is not None else None
        return (wq, bq), (wk, bk), (wv, bv)

    def attention_heads(self, layer: int, x: Tensor, ctx: AttentionContext) -> Tensor:
        block = self.layers[layer]
        attn = block.self_attn
        xn = block.input_layernorm(x)  # (B, T, 3, Hx, d)
        (wq, bq), (wk, bk), (wv, bv) = self._qkv_weights(attn)
        q = self._project_heads(xn[:, :, 0], wq, bq)  # (B, H, T, e)
        k = self._project_heads(xn[:, :, 1], wk, bk)
        v = self._project_heads(xn[:, :, 2], wv, bv)
        cos, sin = ctx.rotary
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if ctx.sliding_mask is not None and layer in self.sliding_layers:
            ctx = replace(ctx, mask=ctx.sliding_mask)
        o = self._attend(q, k, v, ctx, scale=self.head_dim ** -0.5)
        w_out = attn.o_proj.weight.view(self.d_model, self.n_heads, self.head_dim).permute(1, 2, 0)
        return self._heads_out(o, w_out)

    def attention_bias(self, layer: int):
        return self.layers[layer].self_attn.o_proj.bias

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        return block.mlp(block.post_attention_layernorm(x))

    def unembed(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self.backbone.norm(x))
