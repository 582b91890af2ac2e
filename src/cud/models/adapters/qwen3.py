"""Qwen3: the Llama layout (RMSNorm, rotary, gated MLP, grouped-query attention, ungrouped keys
and values per query head) plus a per-head RMSNorm on q (``q_norm``) and on k (``k_norm``) over
the head dimension, applied after the projection and before rotary. ``head_dim`` is its own
config entry (128 in the released models), independent of ``hidden_size / num_attention_heads``.
Sliding-window attention follows ``config.layer_types`` (built by the config from
``use_sliding_window`` and ``max_window_layers``).

Nodes are the Llama family's: ``input`` is the token embedding, ``a{l}.h{h}`` head h's slice of
``o_proj`` (bias, if ``attention_bias``, is a constant of the stream), ``m{l}`` the MLP after
``post_attention_layernorm``. q_norm and k_norm live inside :meth:`attend`: a head's q, k, v
*inputs* are its projections of the normalised stream, as for Llama, so the shared capture's
gradients (taken at q, k before q_norm / k_norm) are exact.

This module also holds :class:`WideRMSNorm` and :class:`WideNormLlamaAdapter`, the RMSNorm
handling the Llama-like families added next to Llama (Qwen3, Phi-3, Gemma) share.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cud.models.adapters.base import AttentionContext, ReaderNorm
from cud.models.adapters.llama import LlamaAdapter


class WideRMSNorm(torch.nn.Module):
    """A Hugging Face RMSNorm module (Llama style ``w * x_hat`` or Gemma style
    ``x_hat * (1 + w)``) computed in float32, or in the input's dtype when that is wider.

    HF's RMSNorms upcast to float32 and no further. In float32, bfloat16 and float16 this does HF's
    operations in HF's order (bit-identical outputs); in float64 it stays in float64 where HF drops
    to float32 and back, so that a float64 model is float64 throughout (finite differences and
    float64 gradient checks are then not limited by float32 rounding inside the norms).
    """

    def __init__(self, norm: torch.nn.Module, unit_offset: bool = False):
        super().__init__()
        self.norm = norm
        self.unit_offset = unit_offset
        eps = getattr(norm, "variance_epsilon", None)
        self.eps = norm.eps if eps is None else eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        h = x.to(dtype)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.norm.weight
        if self.unit_offset:  # Gemma: (x_hat * (1 + w)) in float32, then the input's dtype
            return (h * (1.0 + weight.to(dtype))).to(x.dtype)
        return weight * h.to(x.dtype)  # Llama: w * x_hat in the input's dtype

    def reader_norm(self) -> ReaderNorm:
        weight = self.norm.weight
        return ReaderNorm("rms", 1.0 + weight if self.unit_offset else weight, None, self.eps)


class WideNormLlamaAdapter(LlamaAdapter):
    """The Llama adapter with every RMSNorm (attention input, MLP input, final, and any q/k
    norm of a subclass) computed by :class:`WideRMSNorm` instead of the model's module."""

    #: Gemma's norms compute ``x_hat * (1 + w)``
    unit_offset_norms: bool = False

    def _norm(self, module: torch.nn.Module) -> WideRMSNorm:
        return WideRMSNorm(module, self.unit_offset_norms)

    def attention_norm(self, layer: int) -> WideRMSNorm:
        return self._norm(self.layers[layer].input_layernorm)

    def reader_norm(self, layer: int) -> ReaderNorm:
        return self.attention_norm(layer).reader_norm()

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        return block.mlp(self._norm(block.post_attention_layernorm)(x))

    def unembed(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self._norm(self.backbone.norm)(x))


class Qwen3Adapter(WideNormLlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3",)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        attn = self.layers[layer].self_attn
        # per-head RMSNorm over e, shared weights across heads: q, k (B, H, T, e)
        q, k = self._norm(attn.q_norm)(q), self._norm(attn.k_norm)(k)
        return super().attend(layer, q, k, v, ctx)
