"""OLMo 2 (model_type ``olmo2``): a *post-norm* block with no norm before attention or MLP,

    h = x + post_attention_layernorm(o_proj(attn(x))),
    out = h + post_feedforward_layernorm(mlp(h)),

rotary, grouped-query attention (ungrouped per query head, as for Llama), a SwiGLU MLP, a final
RMSNorm, an untied ``lm_head``. ``q_norm`` and ``k_norm`` are RMSNorms over the *whole* q and k
projections (all heads together, ``H * e`` and ``kv * e`` wide), so a head's normalised q depends
on every head's q projection.

Node definitions (this module's :class:`PostNormHeads`, shared with Gemma 2 / 3):

- ``input``: the token embedding; ``m{l}``: ``post_feedforward_layernorm(mlp(x))``, the MLP's
  normalised output, which is what enters the stream.
- ``a{l}.h{h}``: the layer's post-attention norm is one map of the *sum* of the heads, so a head
  has no output of its own in the stream. A head node is its share of the normalised sum,
  ``z_h = w * o_h / r(sum_j o_j)`` (``o_h`` its slice of ``o_proj``, ``r`` the RMS of the layer's
  summed raw head outputs, ``w`` the norm weight): the heads of a layer are decomposed with the
  layer's own normalisation scale, the decomposition TransformerLens applies to a normalised
  residual (``apply_ln_to_stack`` with the cached scale); TransformerLens / EAP-IG have no
  convention that keeps "residual = sum of node outputs" for post-norm heads (their per-head
  ``hook_result`` is before the norm). With it the heads' outputs sum *exactly* (up to rounding)
  to what HF adds to the residual, so every reader still reads a sum of node outputs and edge
  patching, attribution and brute force stay exact and mutually consistent. The scale ``r`` is
  computed from the layer's heads as they are in the run (each from its own, possibly patched,
  input), so patching one head's input changes every head's share of that layer (the norm
  couples them, as in the model). Removing a head (all its out-edges patched to zero) therefore
  subtracts its share ``w * o_h / r`` from the stream; it is *not* zeroing its slice of the
  ``o_proj`` input (which would change ``r``). An ``o_proj`` bias would sit inside the norm and
  belong to no head: such configs (``attention_bias=True``, used by no released OLMo 2) are
  refused.
- q/k/v inputs: a head's q input is the residual it reads; its q is its slice of ``q_norm``
  applied to the *full* q projection of that input (the k input likewise with ``k_norm`` and its
  key/value group's slice), which in the unpatched model is exactly HF's shared computation. There
  is no norm in front of the projections, so the adapter has no :class:`ReaderNorm`; the runner
  then uses the *copies* capture (every head's q, k, v input its own tensor, autograd
  throughout; correct, and several times slower than the shared capture of pre-norm families),
  and in a patched run where heads read different streams each head computes the full q and k
  projections of its own input (H times the projection cost).

All RMSNorms are computed by :class:`WideRMSNorm` (float32, float64 in a float64 model), with
OLMo 2's order of operations (``(w * x_hat)`` in float32, then the input's dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cud.errors import ModelError
from cud.models.adapters.base import AttentionContext, ReaderNorm
from cud.models.adapters.qwen3 import WideNormLlamaAdapter, WideRMSNorm


class Olmo2RMSNorm(WideRMSNorm):
    """:class:`WideRMSNorm` in OLMo 2's order: ``(w * x_hat)`` in float32 (or wider), then cast."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        h = x.to(dtype)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.norm.weight.to(dtype) * h).to(x.dtype)


def norm_share(norm: WideRMSNorm, heads: Tensor, total: Tensor) -> Tensor:
    """(B, T, H, d) raw head outputs and (B, T, d) their sum (computed as the model does, one
    projection of all heads) -> each head's share ``w * o_h / r(sum_j o_j)`` of the norm of the
    sum (the shares add up to ``norm(sum_j o_j)``)."""
    dtype = torch.promote_types(heads.dtype, torch.float32)
    h = heads.to(dtype)
    total = total.to(dtype)
    inv_r = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.eps)  # (B, T, 1)
    weight = norm.norm.weight.to(dtype)
    if norm.unit_offset:
        weight = 1.0 + weight
    return (h * (inv_r * weight)[:, :, None]).to(heads.dtype)


class PostNormHeads:
    """Mixin for adapters whose attention output goes through a norm before entering the stream:
    head nodes are their shares of the normalised sum (see the module docstring)."""

    def __init__(self, model):
        super().__init__(model)
        if any(block.self_attn.o_proj.bias is not None for block in self.layers):
            raise ModelError(f"{self.family}: an attention output bias inside the post-attention "
                             "norm belongs to no head node; such models are not supported")

    def post_attention_norm(self, layer: int) -> WideRMSNorm:
        raise NotImplementedError

    def head_outputs(self, layer: int, o: Tensor) -> Tensor:
        return norm_share(self.post_attention_norm(layer), super().head_outputs(layer, o),
                          super().attention_output(layer, o))

    def attention_output(self, layer: int, o: Tensor) -> Tensor:
        return self.post_attention_norm(layer)(super().attention_output(layer, o))


class Olmo2Adapter(PostNormHeads, WideNormLlamaAdapter):
    family = "olmo2"
    model_types = ("olmo2",)

    def _norm(self, module: torch.nn.Module) -> WideRMSNorm:
        return Olmo2RMSNorm(module)

    def post_attention_norm(self, layer: int) -> WideRMSNorm:
        return self._norm(self.layers[layer].post_attention_layernorm)

    def attention_norm(self, layer: int) -> torch.nn.Module:
        return torch.nn.Identity()  # no norm before attention: heads read the raw stream

    def reader_norm(self, layer: int) -> ReaderNorm | None:
        return None  # q_norm / k_norm act on the projections: the copies capture

    def attention_values(self, layer: int, x: Tensor, ctx: AttentionContext) -> Tensor:
        attn = self.layers[layer].self_attn
        q_norm, k_norm = self._norm(attn.q_norm), self._norm(attn.k_norm)
        h, kv, e = self.n_heads, self.n_kv_heads, self.head_dim
        group = h // kv
        b, t = x.shape[:2]
        if x.dim() == 3:  # one stream for every input: the model's own computation
            q = q_norm(attn.q_proj(x)).view(b, t, h, e)
            k = k_norm(attn.k_proj(x)).view(b, t, kv, e).repeat_interleave(group, 2)
            v = attn.v_proj(x).view(b, t, kv, e).repeat_interleave(group, 2)
        else:  # (B, T, 3, H, d): head j's q is its slice of q_norm(q_proj(its own q input))
            heads = torch.arange(h, device=x.device)
            q = q_norm(attn.q_proj(x[:, :, 0])).view(b, t, h, h, e)[:, :, heads, heads]
            k = k_norm(attn.k_proj(x[:, :, 1])).view(b, t, h, kv, e)[:, :, heads, heads // group]
            v = attn.v_proj(x[:, :, 2]).view(b, t, h, kv, e)[:, :, heads, heads // group]
        return self.attend_qkv(layer, (q, k, v), ctx)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        return self._norm(block.post_feedforward_layernorm)(block.mlp(x))
