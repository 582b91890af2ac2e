"""Gemma (v1, model_type ``gemma``): the Llama layout with

- token embeddings multiplied by sqrt(hidden_size), the factor rounded to the model's dtype as HF
  does (``GemmaTextScaledWordEmbedding``; in bfloat16 the factor itself is a bfloat16);
- RMSNorms computing ``(x_hat * (1 + w)).to(dtype)`` (weights stored as offsets from 1);
- a GeGLU MLP (``gate_proj`` through the configured GELU, tanh-approximated for the released
  models, times ``up_proj``);
- multi-query attention in Gemma-2B (one key/value head), and ``head_dim`` (256) decoupled from
  ``hidden_size / num_attention_heads``;
- the unembedding tied to the (unscaled) embedding matrix, no bias, no logit soft-capping (that
  is Gemma 2).

Nodes: ``input`` is the *scaled* embedding, the vector that actually enters the residual stream
(TransformerLens folds the same factor, in the model's dtype, into its ``W_E``). Heads
``a{l}.h{h}`` are their slices of ``o_proj``, each query head with its own (ungrouped) k and v
inputs; ``m{l}`` is the GeGLU MLP after ``post_attention_layernorm``. The readers' norms are
written out with the effective weight ``1 + w``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cud.errors import ModelError
from cud.models.adapters.qwen3 import WideNormLlamaAdapter


class GemmaAdapter(WideNormLlamaAdapter):
    family = "gemma"
    model_types = ("gemma",)
    unit_offset_norms = True

    def __init__(self, model):
        super().__init__(model)
        if getattr(model.config, "use_bidirectional_attention", False):
            raise ModelError("Gemma with bidirectional attention is not a causal LM; "
                             "only causal Gemma models are supported")

    def embed(self, input_ids: Tensor) -> Tensor:
        emb = self.backbone.embed_tokens
        out = emb(input_ids)
        if hasattr(emb, "embed_scale"):
            # GemmaTextScaledWordEmbedding: embedding * sqrt(d), the factor in the weights' dtype
            return out
        # a plain embedding (the scale applied by the model itself, older transformers)
        return out * torch.tensor(self.d_model ** 0.5, dtype=out.dtype)
