"""The computational graph of METHOD §1, with the node and edge names of the public EAP-IG / MIB
tooling so that circuits can be exchanged.

Index spaces (identical to EAP-IG's):
- *forward* nodes (edge parents, things that write to the residual): ``input`` = 0, then for each
  layer l the heads ``a{l}.h{h}`` at ``1 + l*(H+1) + h`` and the MLP ``m{l}`` at ``1 + l*(H+1) + H``;
- *backward* nodes (edge children, things that read it): for each layer l the q, k, v inputs of
  each head at ``l*(3H+1) + i*H + h`` (i = 0, 1, 2 for q, k, v), the MLP at ``l*(3H+1) + 3H``, and
  ``logits`` last.
An edge is a real (forward, backward) pair; the *edge index space* is the row-major order of those
pairs. A circuit is a boolean (or float) vector over that space, everywhere in cud.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class Graph:
    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool = False
    d_model: int = 0
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @classmethod
    def from_adapter(cls, adapter) -> "Graph":
        return cls(adapter.n_layers, adapter.n_heads, adapter.parallel_attn_mlp, adapter.d_model)

    @property
    def cfg(self) -> dict:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads,
                "parallel_attn_mlp": self.parallel_attn_mlp, "d_model": self.d_model}

    # Sizes and indices ------------------------------------------------------------------------
    @property
    def n_forward(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_backward(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def head_forward(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_forward(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def qkv_backward(self, layer: int, which: int, head: int) -> int:
        return layer * (3 * self.n_heads + 1) + which * self.n_heads + head

    def mlp_backward(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_backward(self) -> int:
        return self.n_backward - 1

    def attention_readers_upstream(self, layer: int) -> int:
        """How many forward nodes (a prefix) feed the heads of ``layer``."""
        return 1 + layer * (self.n_heads + 1)

    def mlp_readers_upstream(self, layer: int) -> int:
        """How many forward nodes (a prefix) feed the MLP of ``layer``."""
        return 1 + layer * (self.n_heads + 1) + (0 if self.parallel_attn_mlp else self.n_heads)

    # Names --------------------------------------------------------------------------------------
    @cached_property
    def forward_names(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    @cached_property
    def backward_names(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            for letter in "qkv":
                names += [f"a{layer}.h{h}<{letter}>" for h in range(self.n_heads)]
            names.append(f"m{layer}")
        return names + ["logits"]

    @cached_property
    def backward_owner(self) -> np.ndarray:
        """(n_backward,) forward index of the node each reader input belongs to; -1 for logits."""
        owner = np.full(self.n_backward, -1, dtype=np.int64)
        for layer in range(self.n_layers):
            for which in range(3):
                for h in range(self.n_heads):
                    owner[self.qkv_backward(layer, which, h)] = self.head_forward(layer, h)
            owner[self.mlp_backward(layer)] = self.mlp_forward(layer)
        return owner

    @cached_property
    def forward_layer(self) -> np.ndarray:
        """(n_forward,) layer of each forward node; the input node is at -1."""
        layers = np.full(self.n_forward, -1, dtype=np.int64)
        for layer in range(self.n_layers):
            layers[self.head_forward(layer, 0): self.mlp_forward(layer) + 1] = layer
        return layers

    @cached_property
    def backward_layer(self) -> np.ndarray:
        """(n_backward,) layer of each reader; logits at ``n_layers``."""
        layers = np.full(self.n_backward, self.n_layers, dtype=np.int64)
        for layer in range(self.n_layers):
            layers[layer * (3 * self.n_heads + 1):(layer + 1) * (3 * self.n_heads + 1)] = layer
        return layers

    # Edges --------------------------------------------------------------------------------------
    @cached_property
    def real_edge_mask(self) -> torch.Tensor:
        """(n_forward, n_backward) bool: which (parent, child) pairs are edges."""
        mask = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        for layer in range(self.n_layers):
            n_att = self.attention_readers_upstream(layer)
            start = self.qkv_backward(layer, 0, 0)
            mask[:n_att, start:start + 3 * self.n_heads] = True
            mask[:self.mlp_readers_upstream(layer), self.mlp_backward(layer)] = True
        mask[:, self.logits_backward] = True
        return mask

    @cached_property
    def edge_index(self) -> torch.Tensor:
        """(n_edges, 2) long: (forward, backward) index of every edge, in edge-index order."""
        return self.real_edge_mask.nonzero()

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[0])

    @cached_property
    def edge_parent(self) -> np.ndarray:
        return self.edge_index[:, 0].numpy()

    @cached_property
    def edge_child(self) -> np.ndarray:
        return self.edge_index[:, 1].numpy()

    def edge_name(self, e: int) -> str:
        return f"{self.forward_names[self.edge_parent[e]]}->{self.backward_names[self.edge_child[e]]}"

    @cached_property
    def edge_names(self) -> list[str]:
        return [self.edge_name(e) for e in range(self.n_edges)]

    @cached_property
    def edge_lookup(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names)}

    @cached_property
    def incoming_edges(self) -> list[np.ndarray]:
        """For each backward node, the edge indices that end in it."""
        order = np.argsort(self.edge_child, kind="stable")
        bounds = np.searchsorted(self.edge_child[order], np.arange(self.n_backward + 1))
        return [order[bounds[b]:bounds[b + 1]] for b in range(self.n_backward)]

    @cached_property
    def readers_of(self) -> list[np.ndarray]:
        """For each forward node, the backward indices that are its inputs (none for input)."""
        owner = self.backward_owner
        return [np.nonzero(owner == f)[0] for f in range(self.n_forward)]

    # Conversions --------------------------------------------------------------------------------
    def to_matrix(self, edge_values: torch.Tensor) -> torch.Tensor:
        """(..., n_edges) -> (..., n_forward, n_backward), zeros (False) off the real edges."""
        shape = edge_values.shape[:-1] + (self.n_forward, self.n_backward)
        out = torch.zeros(shape, dtype=edge_values.dtype, device=edge_values.device)
        out[..., self.real_edge_mask.to(edge_values.device)] = edge_values
        return out

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """(..., n_forward, n_backward) -> (..., n_edges)."""
        return matrix[..., self.real_edge_mask.to(matrix.device)]
