"""The residual-stream view every architecture adapter gives (METHOD §1).

A decoder-only transformer is seen as a set of nodes writing into one residual stream:
``input`` (embeddings), one node per attention head ``a{l}.h{h}`` (its output after the output
projection), one per MLP ``m{l}``, read out by ``logits``. Every reader's input is the residual
sum *before* its layer norm, which is part of the reader. Constant terms that belong to no node
(an attention output bias) are added to the stream by the runner.

An adapter is the only code that knows a family's module names. It exposes the pieces of each
layer as pure functions of tensors (the norm, the per-head q/k/v projections, attention, the
output projection, the MLP); the runner in :mod:`cud.circuits.runner` composes them. The
attention of a layer is split into those pieces so that the runner can let all heads read one
normalised stream (one projection for all heads, as the model itself computes it) when their
inputs are equal, and give each head its own input only when a patch makes them differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AttentionContext:
    """Per-batch tensors attention needs: a boolean mask (B, 1, T, T), True = may attend, and
    the rotary tables (cos, sin) of shape (1, T, rotary_dim) for rotary families."""

    mask: Tensor
    rotary: tuple[Tensor, Tensor] | None = None
    #: the mask of sliding-window layers (Mistral, Qwen2), when the model has any
    sliding_mask: Tensor | None = None


@dataclass(frozen=True)
class ReaderNorm:
    """A reader's normalisation written out: ``y = weight * P(x) / r + bias`` with
    ``r = sqrt(mean(P(x)^2) + eps)``, where P subtracts the mean (LayerNorm, ``kind="layer"``)
    or does nothing (RMSNorm, ``kind="rms"``).

    :mod:`cud.circuits.gradients` applies the Jacobian of this map itself, so that all the heads
    of a layer can read one normalised stream while each still gets its own input gradient.
    """

    kind: str
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def __post_init__(self):
        if self.kind not in ("rms", "layer"):
            raise ValueError(f"unknown norm kind '{self.kind}'")

    @classmethod
    def of_layer_norm(cls, module: torch.nn.LayerNorm) -> "ReaderNorm":
        return cls("layer", module.weight, module.bias, module.eps)

    def normalize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(..., d) -> (x_hat = P(x) / r, r (..., 1)), in float32 (float64 for float64 input)."""
        x = x.double() if x.dtype == torch.float64 else x.float()
        if self.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        r = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x / r, r

    def __call__(self, x: Tensor) -> Tensor:
        """The normalisation itself (what the model's module computes, up to rounding)."""
        x_hat, _ = self.normalize(x)
        y = x_hat if self.weight is None else x_hat * self.weight.to(x_hat.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)


class ResidualAdapter(ABC):
    """Residual-stream view of one model family. Subclasses set the sizes in ``__init__``."""

    #: short family name ("llama", "gpt2", "gpt_neox")
    family: str = ""
    #: Hugging Face ``config.model_type`` values this adapter serves
    model_types: tuple[str, ...] = ()

    n_layers: int
    n_heads: int
    d_model: int
    head_dim: int
    #: True when the MLP of a layer reads the residual *before* that layer's attention (GPT-NeoX)
    parallel_attn_mlp: bool = False

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def context(self, attention_mask: Tensor) -> AttentionContext:
        """Causal + key-padding mask; rotary tables for rotary families. ``attention_mask`` (B, T) bool."""
        t = attention_mask.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :]
        return AttentionContext(mask=mask, rotary=self.rotary(t, attention_mask.device))

    def rotary(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        return None

    # What each family provides ----------------------------------------------------------------
    @abstractmethod
    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, d) output of the ``input`` node (token + position embeddings)."""

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, T, d) the token embedding alone (the reference tooling's ``hook_embed``); the
        ``input`` node of the reference convention. Families without position embeddings:
        :meth:`embed` itself."""
        return self.embed(input_ids)

    def position_embedding(self, input_ids: Tensor) -> Tensor | None:
        """(1, T, d) learned position embeddings added to the tokens' (GPT-2), or None."""
        return None

    @abstractmethod
    def attention_norm(self, layer: int) -> torch.nn.Module:
        """The norm every q, k and v input of ``layer``'s heads goes through (the model's own
        module)."""

    def reader_norm(self, layer: int) -> ReaderNorm | None:
        """That norm written out as a :class:`ReaderNorm`, or None when it is of another kind
        (the runner then gives each head its own normalised copy of the stream, slower)."""
        return None

    @abstractmethod
    def qkv_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """Per *query* head projections of the normalised stream: weight (3, H, d, e) and bias
        (3, H, e) or None, for q, k and v (grouped keys and values repeated per query head).
        ``y @ weight[i, h] + bias[i, h]`` is head h's q (i = 0), k (1) or v (2) before rotary."""

    def project_qkv(self, layer: int, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, d) normalised stream every head reads -> q, k, v per query head, before
        rotary, each (B, T, H, e). Families override this with their own (fused, grouped)
        projections."""
        weight, bias = self.qkv_weights(layer)
        qkv = torch.einsum("btd,khde->btkhe", y, weight)
        return (qkv if bias is None else qkv + bias).unbind(2)

    @abstractmethod
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """(B, H, T, e) q, k, v per query head, before rotary -> (B, H, T, e) attention-weighted
        values (rotary, the family's scale and the mask applied)."""

    @abstractmethod
    def output_weight(self, layer: int) -> Tensor:
        """(H, e, d): each head's slice of the attention output projection."""

    @abstractmethod
    def attention_bias(self, layer: int) -> Tensor | None:
        """(d,) bias added after the attention output projection, or None."""

    @abstractmethod
    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """(B, T, d) residual input (before the norm) -> (B, T, d) MLP output, bias included."""

    @abstractmethod
    def unembed(self, x: Tensor) -> Tensor:
        """(..., d) final residual (before the final norm) -> (..., vocab) logits."""

    # Attention composed from the pieces ----------------------------------------------------------
    def attention_values(self, layer: int, x: Tensor, ctx: AttentionContext) -> Tensor:
        """Attention-weighted values (B, H, T, e) of ``layer``'s heads.

        ``x``: the residual inputs before the norm, either (B, T, d), one stream every q, k and v
        input reads, or (B, T, 3, H, d), each head's own q, k and v input.
        """
        xn = self.attention_norm(layer)(x)
        if x.dim() == 3:
            qkv = self.project_qkv(layer, xn)
        else:
            weight, bias = self.qkv_weights(layer)
            qkv = torch.einsum("btkhd,khde->btkhe", xn, weight)
            if bias is not None:
                qkv = qkv + bias
            qkv = qkv.unbind(2)
        return self.attend_qkv(layer, qkv, ctx)

    def attend_qkv(self, layer: int, qkv: tuple[Tensor, Tensor, Tensor], ctx: AttentionContext
                   ) -> Tensor:
        """q, k, v each (B, T, H, e) -> (B, H, T, e), see :meth:`attend`."""
        q, k, v = (x.transpose(1, 2) for x in qkv)
        return self.attend(layer, q, k, v, ctx)

    def attention_heads(self, layer: int, x: Tensor, ctx: AttentionContext) -> Tensor:
        """Per-head outputs (B, T, H, d) of ``layer``'s attention, output bias excluded; ``x`` as
        in :meth:`attention_values`."""
        return self.head_outputs(layer, self.attention_values(layer, x, ctx))

    def head_outputs(self, layer: int, o: Tensor) -> Tensor:
        """(B, H, T, e) attention-weighted values -> (B, T, H, d) the heads' node outputs: each
        head's slice of the output projection. Post-norm families (a norm over the layer's
        summed attention output) override this with their own node definition."""
        return (o @ self.output_weight(layer)).transpose(1, 2)

    def attention_output(self, layer: int, o: Tensor) -> Tensor:
        """(B, H, T, e) -> (B, T, d): the sum of the heads' outputs in one projection (what the
        model computes), output bias excluded."""
        b, h, t, e = o.shape
        w_out = self.output_weight(layer)
        return o.transpose(1, 2).reshape(b, t, h * e) @ w_out.reshape(h * e, -1)

    # Helpers shared by families -------------------------------------------------------------
    @staticmethod
    def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                scale=scale)
