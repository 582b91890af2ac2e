"""The ``localize`` strategy's parameter masks: which entries of which parameters belong to the
components the forget set's circuits use most.

A component is a graph node that computes: an attention head ``a{l}.h{h}`` or an MLP block
``m{l}``. Its score is the summed |edge attribution| over the forget set of the edges in each
sample's circuit that it writes (as a parent) or reads (as the q, k, v or MLP input it owns):
score(c) = Σ_samples Σ_{e in circuit, e touches c} |s_e|. The top ``localize_k`` components
(default 8, :class:`cud.unlearning.folder.UnlearningSettings`) move; everything else is frozen.

Graph nodes become parameter entries through the family adapter only (no module names here):
a head's entries are those its q, k and v projections (:meth:`qkv_weights`, bias included) and
its slice of the output projection (:meth:`output_weight`) are made of, found by differentiating
the sum of those slices with respect to the model's parameters (1 or more where an entry is
used, exactly 0 elsewhere); with grouped keys and values, a head's k/v rows are shared with the
other heads of its group and move with it. An MLP block's entries are every entry of every
parameter :meth:`mlp` reads (its norm included).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from cud.circuits.graph import Graph
from cud.errors import ConfigError

_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")


def component_scores(graph: Graph, edge_scores: torch.Tensor,
                     circuits: torch.Tensor | None = None) -> dict[str, float]:
    """Summed |edge attribution| per component (head or MLP), over samples. ``edge_scores``
    (N, E) float; ``circuits`` (N, E) bool: only each sample's circuit edges count (None: all)."""
    magnitude = edge_scores.float().abs()
    if circuits is not None:
        magnitude = magnitude * circuits.to(magnitude.dtype)
    per_edge = magnitude.sum(0).numpy().astype(np.float64)          # (E,)
    totals = np.zeros(graph.n_forward)
    np.add.at(totals, graph.edge_parent, per_edge)                  # written by the component
    owner = graph.backward_owner[graph.edge_child]                  # read by it (-1: logits)
    np.add.at(totals, owner[owner >= 0], per_edge[owner >= 0])
    names = graph.forward_names
    return {names[f]: float(totals[f]) for f in range(1, graph.n_forward)}  # 0 is the input


def top_components(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` highest-scoring components (ties: graph order)."""
    if k < 1:
        raise ConfigError(f"unlearning.localize_k must be at least 1, got {k}")
    order = list(scores)
    return sorted(order, key=lambda c: (-scores[c], order.index(c)))[:k]


def parameter_masks(adapter, components: Sequence[str]) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask (its shape) of the entries of ``components`` in the
    adapter's model (the same names in any copy of it); parameters with no such entry are left
    out."""
    named = dict(adapter.model.named_parameters())
    names, params = list(named), list(named.values())
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in named.items()}
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for component in components:
                head, mlp = _HEAD.match(component), _MLP.match(component)
                if head:
                    layer, h = int(head.group(1)), int(head.group(2))
                    weight, bias = adapter.qkv_weights(layer)          # (3, H, d, e), (3, H, e)
                    total = weight[:, h].sum() + adapter.output_weight(layer)[h].sum()
                    if bias is not None:
                        total = total + bias[:, h].sum()
                    grads = torch.autograd.grad(total, params, allow_unused=True)
                    for n, g in zip(names, grads):
                        if g is not None:
                            masks[n] |= g != 0
                elif mlp:
                    layer = int(mlp.group(1))
                    p0 = params[0]
                    x = torch.randn(1, 2, adapter.d_model, device=p0.device, dtype=p0.dtype)
                    grads = torch.autograd.grad(adapter.mlp(layer, x).sum(), params,
                                                allow_unused=True)
                    for n, g in zip(names, grads):
                        if g is not None:
                            masks[n][...] = True
                else:
                    raise ConfigError(f"localize: '{component}' is not a head (a{{l}}.h{{h}}) "
                                      f"or an MLP (m{{l}})")
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return {n: m for n, m in masks.items() if bool(m.any())}


def localize_masks(adapter, graph: Graph, edge_scores: torch.Tensor,
                   circuits: torch.Tensor | None, k: int) -> tuple[list[str], dict]:
    """(the top-k components, their parameter masks) for a forget set's circuits; refuses
    circuits of a graph other than the model's."""
    if (graph.n_layers, graph.n_heads) != (adapter.n_layers, adapter.n_heads):
        raise ConfigError(f"localize: the circuits' graph has {graph.n_layers} layers x "
                          f"{graph.n_heads} heads, the model {adapter.n_layers} x "
                          f"{adapter.n_heads}: circuits of another model")
    chosen = top_components(component_scores(graph, edge_scores, circuits), k)
    return chosen, parameter_masks(adapter, chosen)
