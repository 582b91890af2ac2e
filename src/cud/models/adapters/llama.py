"""Llama family: Llama 2/3, Mistral, Qwen2, SmolLM2 (RMSNorm, rotary, gated MLP, grouped-query
attention). Keys and values are computed per *query* head ("ungrouped"), so each query head has
its own k and v inputs in the graph, as in the reference setup."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cud.models.adapters.base import AttentionContext, ReaderNorm, ResidualAdapter


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

    def attention_norm(self, layer: int):
        return self.layers[layer].input_layernorm

    def reader_norm(self, layer: int) -> ReaderNorm:
        norm = self.layers[layer].input_layernorm  # LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm
        return ReaderNorm("rms", norm.weight, None, norm.variance_epsilon)

    def qkv_weights(self, layer: int):
        attn = self.layers[layer].self_attn
        h, kv, e, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        group = h // kv
        weights = [attn.q_proj.weight.view(h, e, d),
                   attn.k_proj.weight.view(kv, e, d).repeat_interleave(group, 0),
                   attn.v_proj.weight.view(kv, e, d).repeat_interleave(group, 0)]
        weight = torch.stack(weights).transpose(2, 3)  # (3, H, d, e)
        if attn.q_proj.bias is None:
            return weight, None
        bias = torch.stack([attn.q_proj.bias.view(h, e),
                            attn.k_proj.bias.view(kv, e).repeat_interleave(group, 0),
                            attn.v_proj.bias.view(kv, e).repeat_interleave(group, 0)])
        return weight, bias

    def project_qkv(self, layer: int, y: Tensor):
        attn = self.layers[layer].self_attn
        b, t, _ = y.shape
        h, kv, e = self.n_heads, self.n_kv_heads, self.head_dim
        q = attn.q_proj(y).view(b, t, h, e)
        # grouped keys and values computed once per group, then one copy per query head
        k = attn.k_proj(y).view(b, t, kv, e).repeat_interleave(h // kv, 2)
        v = attn.v_proj(y).view(b, t, kv, e).repeat_interleave(h // kv, 2)
        return q, k, v

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        cos, sin = ctx.rotary
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        mask = ctx.sliding_mask if ctx.sliding_mask is not None and layer in self.sliding_layers \
            else ctx.mask
        return self._sdpa(q, k, v, mask, scale=self.head_dim ** -0.5)

    def output_weight(self, layer: int) -> Tensor:
        o_proj = self.layers[layer].self_attn.o_proj
        return o_proj.weight.view(self.d_model, self.n_heads, self.head_dim).permute(1, 2, 0)

    def attention_bias(self, layer: int):
        return self.layers[layer].self_attn.o_proj.bias

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        return block.mlp(block.post_attention_layernorm(x))

    def unembed(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self.backbone.norm(x))
