"""The CUD score (METHOD §4): CUD_i = d_E / (d_E + d_H), 0.5 when both distances are 0.

d_E = d(C_i, C_E) and d_H = d(C_i, C_H) are distances between a sample's circuit and the easy and
hard anchor circuits. CUD = 0 at the easy anchor, 1 at the hard anchor: **high = hard**.

Circuits are compared as vectors over the graph's edge index space:

- *binary*: the 0/1 circuit;
- *weighted* (ours): |edge score| masked to the circuit, scaled to a maximum of 1 per circuit, so
  the overall size of a sample's scores (which varies with the answer and the metric) does not
  count, only where within its circuit the weight lies.

Distances, all in [0, 1] for such vectors (non-negative, at most 1):

- ``cosine``: 1 - x·y / (|x| |y|);
- ``jaccard``: 1 - Σ min(x, y) / Σ max(x, y) (the ordinary Jaccard distance on 0/1 vectors);
- ``hamming``: mean |x - y| over all edges (the normalised Hamming distance on 0/1 vectors).

Two empty circuits are at distance 0; an empty and a non-empty one at distance 1.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from cud.circuits.selection import SelectionSettings, select
from cud.difficulty.anchors import AnchorCircuits
from cud.errors import ConfigError

DISTANCES = ("cosine", "jaccard", "hamming")


def circuit_weights(edge_scores: Tensor, circuits: Tensor) -> Tensor:
    """(N, E) scores and (N, E) bool circuits -> (N, E) weights in [0, 1]: |score| on the
    circuit's edges, each row divided by its maximum (an all-zero row stays zero)."""
    w = edge_scores.abs().double() * circuits.double()
    top = w.amax(dim=-1, keepdim=True)
    return torch.where(top > 0, w / top.clamp_min(torch.finfo(torch.float64).tiny), w)


def distance(x: Tensor, y: Tensor, name: str = "cosine") -> Tensor:
    """Distance between each row of ``x`` (N, E) and ``y`` (E,) (or (N, E)): (N,) float64.
    Both must be non-negative (0/1 circuits or :func:`circuit_weights`)."""
    if name not in DISTANCES:
        raise ConfigError(f"unknown distance '{name}' (choose from {', '.join(DISTANCES)})")
    x = x.double()
    y = y.double().expand_as(x)
    if name == "hamming":
        return (x - y).abs().mean(-1).clamp(0, 1)
    if name == "jaccard":
        hi = torch.maximum(x, y).sum(-1)
        lo = torch.minimum(x, y).sum(-1)
        d = 1 - lo / hi.clamp_min(torch.finfo(torch.float64).tiny)
        return torch.where(hi > 0, d, torch.zeros_like(d)).clamp(0, 1)
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    cos = (x * y).sum(-1) / (nx * ny).clamp_min(torch.finfo(torch.float64).tiny)
    d = 1 - cos
    d = torch.where((nx == 0) & (ny == 0), torch.zeros_like(d), d)
    d = torch.where((nx == 0) ^ (ny == 0), torch.ones_like(d), d)
    return d.clamp(0, 1)


def cud_from_distances(d_easy: Tensor, d_hard: Tensor) -> Tensor:
    """d_E / (d_E + d_H); 0.5 where both are 0 (the sample is at both anchors at once)."""
    total = d_easy + d_hard
    safe = total.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(total > 0, d_easy / safe, torch.full_like(total, 0.5))


def cud_scores(edge_scores: Tensor, anchors: AnchorCircuits, *, distance_name: str = "cosine",
               weighted: bool = False, circuits: Tensor | None = None,
               selection: SelectionSettings | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(CUD, d_E, d_H), each (N,), of samples with ``edge_scores`` (N, E).

    The samples' circuits are ``circuits`` (N, E) when given, else selected from the scores with
    ``selection`` (default: the anchors'); the anchor circuits are binarised with the same
    selection, so both sides always have the same size."""
    sel = selection or anchors.selection
    if sel != anchors.selection:
        anchors = anchors.with_selection(sel)
    if edge_scores.shape[-1] != anchors.graph.n_edges:
        raise ConfigError(f"scores have {edge_scores.shape[-1]} edges, the anchors' graph "
                          f"{anchors.graph.n_edges}")
    if circuits is None:
        circuits = select(anchors.graph, edge_scores, sel)
    if weighted:
        x = circuit_weights(edge_scores, circuits)
        easy = circuit_weights(anchors.easy_scores[None], anchors.easy_circuit[None])[0]
        hard = circuit_weights(anchors.hard_scores[None], anchors.hard_circuit[None])[0]
    else:
        x, easy, hard = circuits, anchors.easy_circuit, anchors.hard_circuit
    d_e = distance(x, easy, distance_name)
    d_h = distance(x, hard, distance_name)
    return cud_from_distances(d_e, d_h), d_e, d_h


def score_samples(ids: Sequence[str], edge_scores: Tensor, anchors: AnchorCircuits, *,
                  distance_name: str = "cosine", weighted: bool = False,
                  circuits: Tensor | None = None, selection: SelectionSettings | None = None
                  ) -> pd.DataFrame:
    """The per-sample CUD table: ``id``, ``cud``, ``d_E``, ``d_H``, the distance, whether
    weighted, the circuit size, the sample's own ``anchor_role`` (easy/hard/empty) and which
    ``anchors`` were used (their name and fingerprint)."""
    if len(ids) != edge_scores.shape[0]:
        raise ConfigError(f"{len(ids)} ids for {edge_scores.shape[0]} rows of edge scores")
    cud, d_e, d_h = cud_scores(edge_scores, anchors, distance_name=distance_name,
                               weighted=weighted, circuits=circuits, selection=selection)
    sel = selection or anchors.selection
    a = anchors.anchors
    return pd.DataFrame({
        "id": list(ids), "cud": cud.numpy(), "d_E": d_e.numpy(), "d_H": d_h.numpy(),
        "distance": distance_name, "weighted": weighted,
        "n_edges": sel.n_edges if sel.selection != "threshold" else None,
        "anchor_role": [a.role(i) for i in ids],
        "anchors": f"{a.name}#{a.fingerprint}",
    })
