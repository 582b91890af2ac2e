"""From edge scores to circuits (METHOD §3). A circuit is a (B, n_edges) bool tensor.

- ``greedy`` (reference default, 75 edges): start at ``logits``; repeatedly add the highest-|score|
  edge whose child already belongs to the circuit; its parent joins. Connected, exactly n edges
  (fewer only when the graph has fewer edges reachable from ``logits``).
- ``topn``: the n highest-|score| edges, then pruned to the edges on a path input -> logits.
- ``threshold``: edges with |score| >= t, pruned the same way (ours: so every circuit is connected).

All three run on the whole batch at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from cud.circuits.graph import Graph
from cud.errors import ConfigError

SELECTIONS = ("greedy", "topn", "threshold")


@dataclass(frozen=True)
class SelectionSettings:
    selection: str = "greedy"
    n_edges: int = 75
    threshold: float | None = None

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection '{self.selection}' "
                              f"(choose from {', '.join(SELECTIONS)})")
        if self.selection == "threshold" and self.threshold is None:
            raise ConfigError("selection 'threshold' needs --threshold")
        if self.threshold is not None and not (math.isfinite(self.threshold)
                                               and self.threshold >= 0):
            # NaN would compare false with every score and leave every circuit empty
            raise ConfigError(f"threshold must be a finite number >= 0, got {self.threshold}")
        if self.selection != "threshold" and self.n_edges < 1:
            raise ConfigError(f"n_edges must be at least 1, got {self.n_edges}")

    def to_dict(self) -> dict:
        return asdict(self)


def _node_incoming(graph: Graph) -> Tensor:
    """(n_forward + 1, n_edges) bool: edges ending in an input of each node; the last row is
    ``logits``."""
    cache = graph._cache
    if "node_incoming" not in cache:
        owner = torch.as_tensor(graph.backward_owner)
        child_owner = owner[torch.as_tensor(graph.edge_child)]
        child_owner = torch.where(child_owner < 0, graph.n_forward, child_owner)
        rows = torch.zeros(graph.n_forward + 1, graph.n_edges, dtype=torch.bool)
        rows[child_owner, torch.arange(graph.n_edges)] = True
        cache["node_incoming"] = rows
    return cache["node_incoming"]


def _child_node(graph: Graph) -> Tensor:
    """(E,) the forward node whose input each edge ends in; ``logits`` is ``n_forward``."""
    cache = graph._cache
    if "child_node" not in cache:
        owner = torch.as_tensor(graph.backward_owner)[torch.as_tensor(graph.edge_child)]
        cache["child_node"] = torch.where(owner < 0, graph.n_forward, owner)
    return cache["child_node"]


def greedy(graph: Graph, edge_scores: Tensor, n_edges: int, *, window: int = 64) -> Tensor:
    """(B, E) scores -> (B, E) bool circuits grown from ``logits`` by highest |score|.

    The same circuits as adding one edge at a time (:func:`greedy_stepwise`), several edges per
    round: the open edges are visited in decreasing |score| (ties by edge index, as argmax
    breaks them), and a run of the ``window`` best ones is taken at once as long as none of the
    nodes it brings in has an incoming edge scoring at least as high as the next edge of the
    run (such an edge would have been chosen first). Far fewer rounds than edges for large
    circuits."""
    b, e = edge_scores.shape
    device = edge_scores.device
    f = graph.n_forward
    incoming = _node_incoming(graph).to(device)                      # (F + 1, E)
    parent = torch.as_tensor(graph.edge_parent, device=device)
    child_node = _child_node(graph).to(device)                       # (E,) owner, logits = F
    magnitude = edge_scores.abs().float()
    order = torch.argsort(-magnitude, dim=1, stable=True)           # (B, E)
    sorted_mag = magnitude.gather(1, order)
    # the best incoming |score| of every node: what a node joining the circuit makes open
    best_in = torch.full((b, f + 1), -1.0, device=device).scatter_reduce_(
        1, child_node.expand(b, e), magnitude, "amax")
    chosen = torch.zeros(b, e, dtype=torch.bool, device=device)
    in_circuit = torch.zeros(b, f + 1, dtype=torch.bool, device=device)
    in_circuit[:, f] = True
    open_ = incoming[f].expand(b, e).clone()
    count = torch.zeros(b, dtype=torch.long, device=device)
    target = min(n_edges, e)
    arange = torch.arange(e, device=device)
    while True:
        active = (count < target) & open_.any(1)
        if not active.any():
            break
        # the first `window` open edges of each row, in decreasing |score|
        open_sorted = open_.gather(1, order)
        pos = torch.where(open_sorted, arange, e).topk(min(window, e), dim=1, largest=False)
        pos = pos.values                                             # (B, W), e = none
        valid = (pos < e) & active[:, None]
        cand = order.gather(1, pos.clamp(max=e - 1))
        score = sorted_mag.gather(1, pos.clamp(max=e - 1))
        par = parent[cand]                                           # (B, W)
        joins = ~in_circuit.gather(1, par)
        earlier = (par[:, :, None] == par[:, None, :]).tril(-1).any(2)   # parent seen before
        threat = torch.where(joins & ~earlier & valid, best_in.gather(1, par),
                             torch.full_like(score, -1.0))
        before = torch.cat([torch.full_like(threat[:, :1], -1.0),
                            threat.cummax(1).values[:, :-1]], 1)
        ok = valid & (score > before)
        ok[:, 0] = valid[:, 0]
        ok = ok.cumprod(1).bool()
        ok &= torch.arange(ok.shape[1], device=device)[None] < (target - count)[:, None]
        take_rows, take_cols = ok.nonzero(as_tuple=True)
        edges = cand[take_rows, take_cols]
        chosen[take_rows, edges] = True
        count += ok.sum(1)
        new_nodes = par[take_rows, take_cols]
        fresh = ~in_circuit[take_rows, new_nodes]
        in_circuit[take_rows, new_nodes] = True
        if fresh.any():
            opened = torch.zeros(b, e, device=device).index_add_(
                0, take_rows[fresh], incoming[new_nodes[fresh]].float())
            open_ |= opened > 0
        open_ &= ~chosen
    return chosen


def greedy_stepwise(graph: Graph, edge_scores: Tensor, n_edges: int) -> Tensor:
    """:func:`greedy` one edge at a time (the definition; n rounds over the whole graph)."""
    b, e = edge_scores.shape
    incoming = _node_incoming(graph).to(edge_scores.device)
    parent = torch.as_tensor(graph.edge_parent, device=edge_scores.device)
    magnitude = edge_scores.abs().float()
    chosen = torch.zeros(b, e, dtype=torch.bool, device=edge_scores.device)
    in_circuit = torch.zeros(b, graph.n_forward + 1, dtype=torch.bool, device=edge_scores.device)
    in_circuit[:, graph.n_forward] = True
    candidate = incoming[graph.n_forward].expand(b, e).clone()
    rows = torch.arange(b, device=edge_scores.device)
    for _ in range(min(n_edges, e)):
        open_ = candidate & ~chosen
        has = open_.any(1)
        if not has.any():
            break
        best = torch.where(open_, magnitude, torch.tensor(-1.0, device=magnitude.device)).argmax(1)
        rows_h, best_h = rows[has], best[has]
        chosen[rows_h, best_h] = True
        p = parent[best_h]
        new = ~in_circuit[rows_h, p]
        in_circuit[rows_h, p] = True
        if new.any():
            candidate[rows_h[new]] |= incoming[p[new]]
    return chosen


def prune(graph: Graph, circuit: Tensor) -> Tensor:
    """Keep only the edges of ``circuit`` (B, E) that lie on a path from input to logits."""
    b = circuit.shape[0]
    m = graph.to_matrix(circuit)  # (B, F, Bk) bool
    f_n = graph.n_forward
    reach_in = torch.zeros(b, f_n, dtype=torch.bool, device=circuit.device)
    reach_in[:, 0] = True
    for f in range(1, f_n):  # forward order is topological
        readers = torch.as_tensor(graph.readers_of[f], device=circuit.device)
        reach_in[:, f] = (m[:, :f, readers] & reach_in[:, :f, None]).flatten(1).any(1)
    # a backward node "reaches logits" when it is logits or its owner has a kept edge onward
    reach_out = torch.zeros(b, f_n, dtype=torch.bool, device=circuit.device)
    child_ok = torch.zeros(b, graph.n_backward, dtype=torch.bool, device=circuit.device)
    child_ok[:, graph.logits_backward] = True
    for f in range(f_n - 1, -1, -1):
        reach_out[:, f] = (m[:, f] & child_ok).any(1)
        if f > 0:
            child_ok[:, torch.as_tensor(graph.readers_of[f], device=circuit.device)] = \
                reach_out[:, f:f + 1]
    keep = m & reach_in[:, :, None] & child_ok[:, None, :]
    return graph.from_matrix(keep)


def select(graph: Graph, edge_scores: Tensor, settings: SelectionSettings = SelectionSettings()
           ) -> Tensor:
    """(B, E) edge scores -> (B, E) bool circuits."""
    if settings.selection == "greedy":
        return greedy(graph, edge_scores, settings.n_edges)
    magnitude = edge_scores.abs()
    if settings.selection == "topn":
        k = min(settings.n_edges, edge_scores.shape[1])
        top = magnitude.topk(k, dim=1).indices
        circuit = torch.zeros_like(edge_scores, dtype=torch.bool).scatter_(1, top, True)
    else:
        circuit = magnitude >= settings.threshold
    return prune(graph, circuit)
