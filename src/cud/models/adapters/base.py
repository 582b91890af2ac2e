"""The residual-stream view every architecture adapter gives (METHOD §1).

A decoder-only transformer is seen as a set of nodes writing into one residual stream:
``input`` (embeddings), one node per attention head ``a{l}.h{h}`` (its output after the output
projection), one per MLP ``m{l}``, read out by ``logits``. Every reader's input is the residual
sum *before* its layer norm, which is part of the reader. Constant terms that belong to no node
(an attention output bias) are added to the stream by the runner.

An adapter is the only code that knows a family's module names. It exposes four pure functions
of tensors; the runner in :mod:`cud.circuits.runner` composes them.
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

    @abstractmethod
    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, d) output of the ``input`` node (token + position embeddings)."""

    @abstractmethod
    def attention_heads(self, layer: int, x: Tensor, ctx: AttentionContext) -> Tensor:
        """Per-head outputs of layer ``layer``'s attention.

        ``x``: (B, T, 3, Hx, d) residual inputs of the q, k and v inputs of each head, before the
        layer norm; Hx is ``n_heads`` or 1 (every head reads the same stream). Returns
        (B, T, H, d): each head's contribution to the residual stream, output bias excluded.
        """

    @abstractmethod
    def attention_bias(self, layer: int) -> Tensor | None:
        """(d,) bias added after the attention output projection, or None."""

    @abstractmethod
    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """(B, T, d) residual input (before the norm) -> (B, T, d) MLP output, bias included."""

    @abstractmethod
    def unembed(self, x: Tensor) -> Tensor:
        """(..., d) final residual (before the final norm) -> (..., vocab) logits."""

    # Helpers shared by families -------------------------------------------------------------
    @staticmethod
    def _project_heads(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Per-head projection. x (B, T, Hx, d), weight (H, d, e), bias (H, e) -> (B, H, T, e)."""
        out = x.transpose(1, 2) @ weight  # (B, Hx, T, d) @ (H, d, e) broadcasts Hx=1 over heads
        if bias is not None:
            out = out + bias[None, :, None, :]
        return out

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, scale: float) -> Tensor:
        """(B, H, T, e) each -> (B, H, T, e) attention-weighted values."""
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask,
                                                                scale=scale)

    @staticmethod
    def _heads_out(o: Tensor, w_out: Tensor) -> Tensor:
        """o (B, H, T, e), w_out (H, e, d) -> (B, T, H, d) each head's residual contribution."""
        return (o @ w_out).transpose(1, 2)
