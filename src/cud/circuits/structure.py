"""Structure statistics of circuits: where in the model a circuit lives, and how long its edges
and paths are. The paper's mechanistic claim (METHOD §8: easy samples' circuits are short,
shallow and early-to-middle; hard samples' are long, deep and late) is checked on these numbers.

Everything here speaks graph nodes and edges only (:class:`~cud.circuits.graph.Graph`), and is
vectorised over N circuits given as an (N, E) boolean array (a float array counts its nonzero
entries as the circuit).

Layer coordinates (those of :class:`Graph`):
- a *writer* (forward node) sits at its layer: ``a{l}.h{h}`` and ``m{l}`` at l, ``input`` at -1;
- a *reader* (backward node) sits at its layer: the q/k/v inputs of ``a{l}.h{h}`` and ``m{l}`` at l,
  ``logits`` at L = ``graph.n_layers``.

Definitions:
- **edge span** of an edge u -> v: ``layer(v) - layer(u)``, in [0, L + 1]. 1 joins adjacent layers
  (``a2.h0 -> a3.h1<q>``), 0 an attention head to the MLP of its own layer, L + 1 ``input ->
  logits``. A circuit's ``edge_span_mean`` / ``edge_span_max`` summarise its edges' spans.
- **edge layer**: the layer of the edge's reader (where the edge's information is used), logits at
  L. :func:`edge_layer_counts` is the distribution of a circuit's edges over these L + 1 bins.
- **internal nodes**: the heads and MLPs a circuit touches (the parent of one of its edges or the
  owner of the reader of one). ``input`` and ``logits`` are left out: every complete circuit holds
  both, at fixed layers, and they would only dilute the layer statistics.
- **last third**: the last max(1, round(L / 3)) layers (L = 30: layers 20-29; L = 16: 11-15;
  L = 4: layer 3; never empty), plus ``logits`` for edges. ``last_third_edge_share``: share of
  the circuit's edges whose reader is there; ``last_third_node_share``: share of its internal
  nodes there.
- **path**: a chain input -> (reader of) n1, n1 -> (reader of) n2, ..., nk -> logits of circuit
  edges, where each edge leaves the node the previous edge entered. Every such path climbs from
  layer -1 to L, so in layers every complete path has the same extent L + 1; what differs is how
  many edges (hops) it takes. **Path length** is that number of edges: 1 for ``input -> logits``,
  2 for input -> a head -> logits, and so on; its mean edge span is (L + 1) / length.
  ``path_longest`` / ``path_shortest`` are the longest / shortest such path of the circuit, NaN when
  the circuit holds no input-to-logits path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from cud.circuits.graph import Graph

#: statistic -> (what it measures, the paper's expectation for hard vs easy circuits:
#: +1 = higher in hard, -1 = lower in hard, 0 = no claim)
STATISTICS: dict[str, tuple[str, int]] = {
    "n_edges": ("edges in the circuit", 0),
    "n_nodes": ("internal nodes (heads and MLPs) in the circuit", 0),
    "edge_span_mean": ("mean edge span in layers (reader layer - writer layer)", +1),
    "edge_span_max": ("longest edge span in layers", +1),
    "edge_layer_mean": ("mean reader layer of the edges (logits = L)", +1),
    "node_layer_mean": ("mean layer of the internal nodes", +1),
    "node_layer_min": ("earliest layer of an internal node", +1),
    "node_layer_max": ("deepest layer of an internal node", +1),
    "last_third_edge_share": ("share of edges read in the last third of the layers or by "
                              "logits", +1),
    "last_third_node_share": ("share of internal nodes in the last third of the layers", +1),
    "path_longest": ("edges on the longest input-to-logits path", +1),
    "path_shortest": ("edges on the shortest input-to-logits path", 0),
}


def as_circuits(circuits, graph: Graph) -> np.ndarray:
    """(N, E) or (E,) bool/float array or tensor -> (N, E) numpy bool (nonzero = in the circuit)."""
    if hasattr(circuits, "detach"):
        circuits = circuits.detach().cpu().numpy()
    array = np.asarray(circuits)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != graph.n_edges:
        raise ValueError(f"circuits must be (N, {graph.n_edges}) for this graph, "
                         f"got {tuple(np.shape(circuits))}")
    return array if array.dtype == bool else array != 0


@dataclass(frozen=True)
class _Members:
    """Every (circuit, edge) pair of N circuits. A circuit holds few of the graph's edges, so
    every statistic is a bincount over these pairs rather than an (N, E) product."""

    n: int
    rows: np.ndarray       # (M,) which circuit
    edges: np.ndarray      # (M,) which edge

    @classmethod
    def of(cls, graph: Graph, circuits) -> "_Members":
        circuits = as_circuits(circuits, graph)
        rows, edges = np.nonzero(circuits)
        return cls(len(circuits), rows, edges)


def last_third_layers(n_layers: int) -> np.ndarray:
    """(L,) bool: which layers form the last third: the last max(1, round(L / 3)) layers."""
    k = max(1, round(n_layers / 3))
    return np.arange(n_layers) >= n_layers - k


def edge_span(graph: Graph) -> np.ndarray:
    """(E,) int: reader layer - writer layer of every edge (input at -1, logits at L)."""
    return graph.backward_layer[graph.edge_child] - graph.forward_layer[graph.edge_parent]


def edge_layer(graph: Graph) -> np.ndarray:
    """(E,) int: the layer of every edge's reader, 0..L-1, logits at L."""
    return graph.backward_layer[graph.edge_child]


def _reader_node(graph: Graph, edges: np.ndarray) -> np.ndarray:
    """Forward index of the node that reads each edge; ``logits`` as n_forward."""
    owner = graph.backward_owner[graph.edge_child[edges]]
    return np.where(owner < 0, graph.n_forward, owner)


def _node_membership(graph: Graph, m: _Members) -> np.ndarray:
    out = np.zeros((m.n, graph.n_forward + 1), dtype=bool)
    out[m.rows, graph.edge_parent[m.edges]] = True
    out[m.rows, _reader_node(graph, m.edges)] = True
    return out[:, :-1]                                           # drop logits


def node_membership(graph: Graph, circuits) -> np.ndarray:
    """(N, F) bool: which forward nodes each circuit touches (as a parent or as the owner of a
    reader). Column 0 is ``input``; ``logits`` is not a forward node."""
    return _node_membership(graph, _Members.of(graph, circuits))


def _node_layer_counts(graph: Graph, members: np.ndarray) -> np.ndarray:
    rows, nodes = np.nonzero(members[:, 1:])                      # drop input
    layers = graph.forward_layer[1:][nodes]
    n, size = len(members), graph.n_layers
    return np.bincount(rows * size + layers, minlength=n * size).reshape(n, size)


def node_layer_counts(graph: Graph, circuits) -> np.ndarray:
    """(N, L) int: internal nodes (heads and MLPs) of each circuit per layer."""
    return _node_layer_counts(graph, node_membership(graph, circuits))


def edge_layer_counts(graph: Graph, circuits) -> np.ndarray:
    """(N, L + 1) int: edges of each circuit by the layer of their reader; the last column is
    ``logits``."""
    m = _Members.of(graph, circuits)
    size = graph.n_layers + 1
    flat = np.bincount(m.rows * size + edge_layer(graph)[m.edges], minlength=m.n * size)
    return flat.reshape(m.n, size)


def layer_pair_counts(graph: Graph, circuits) -> np.ndarray:
    """(N, L + 1, L + 1) float: edges of each circuit by (reader layer, writer layer).

    Row r is the reader layer r (row L: ``logits``); column c is the writer layer c - 1 (column 0:
    ``input``). Every edge lies on or below the diagonal r = c - 1 (span >= 0); its distance below
    the diagonal is its span. A float ``circuits`` (e.g. a mean over several circuits) is summed
    with its weights."""
    if hasattr(circuits, "detach"):
        circuits = circuits.detach().cpu().numpy()
    weights = np.asarray(circuits, dtype=np.float64)
    if weights.ndim == 1:
        weights = weights[None]
    if weights.ndim != 2 or weights.shape[1] != graph.n_edges:
        raise ValueError(f"circuits must be (N, {graph.n_edges}) for this graph, "
                         f"got {weights.shape}")
    size = graph.n_layers + 1
    rows, edges = np.nonzero(weights)
    cell = edge_layer(graph)[edges] * size + graph.forward_layer[graph.edge_parent[edges]] + 1
    flat = np.bincount(rows * size * size + cell, weights=weights[rows, edges],
                       minlength=len(weights) * size * size)
    return flat.reshape(len(weights), size, size)


def _path_lengths(graph: Graph, m: _Members) -> tuple[np.ndarray, np.ndarray]:
    # the circuit edges grouped by the node that reads them, nodes in index order, which is
    # topological (a node reads only nodes of smaller index; logits, at n_forward, reads all)
    reader = _reader_node(graph, m.edges)
    order = np.argsort(reader, kind="stable")
    rows, parents = m.rows[order], graph.edge_parent[m.edges[order]]
    bounds = np.searchsorted(reader[order], np.arange(graph.n_forward + 2))
    # longest / shortest path from input to each node's output, for every circuit at once
    longest = np.full((m.n, graph.n_forward + 1), -np.inf)
    shortest = np.full((m.n, graph.n_forward + 1), np.inf)
    longest[:, 0] = shortest[:, 0] = 0
    for node in range(1, graph.n_forward + 1):
        a, b = bounds[node], bounds[node + 1]
        if a == b:
            continue
        r, up = rows[a:b], parents[a:b]
        np.maximum.at(longest[:, node], r, longest[r, up] + 1)
        np.minimum.at(shortest[:, node], r, shortest[r, up] + 1)
    hi, lo = longest[:, -1], shortest[:, -1]
    return np.where(np.isfinite(hi), hi, np.nan), np.where(np.isfinite(lo), lo, np.nan)


def path_lengths(graph: Graph, circuits) -> tuple[np.ndarray, np.ndarray]:
    """Longest and shortest input-to-logits path of each circuit, in edges (see the module
    docstring); ((N,), (N,)) float, NaN where a circuit has no such path.

    One pass over the nodes in topological order, carrying for every circuit at once the longest
    and shortest path from ``input`` to each node's output."""
    return _path_lengths(graph, _Members.of(graph, circuits))


def structure_statistics(graph: Graph, circuits, ids: Sequence[str] | None = None
                         ) -> pd.DataFrame:
    """One row per circuit, one column per statistic of :data:`STATISTICS` (definitions in the
    module docstring). Index: ``ids`` (named ``id``) when given, else 0..N-1.

    ``circuits``: (N, E) or (E,) bool (or float: nonzero = in the circuit), numpy or torch."""
    m = _Members.of(graph, circuits)
    n, n_layers = m.n, graph.n_layers
    if ids is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} circuits")
    rows, edges = m.rows, m.edges
    span = edge_span(graph)[edges].astype(np.float64)
    reader_layer = edge_layer(graph)[edges]
    late = np.append(last_third_layers(n_layers), True)[reader_layer]     # + logits

    def per_circuit(values: np.ndarray) -> np.ndarray:
        return np.bincount(rows, weights=values, minlength=n)

    n_edges = np.bincount(rows, minlength=n).astype(np.float64)
    span_max = np.full(n, -np.inf)
    np.maximum.at(span_max, rows, span)
    span_max[~np.isfinite(span_max)] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        span_sum = per_circuit(span)
        layer_sum = per_circuit(reader_layer.astype(np.float64))
        late_sum = per_circuit(late.astype(np.float64))

        nodes = _node_layer_counts(graph, _node_membership(graph, m)).astype(np.float64)
        n_nodes = nodes.sum(1)
        layers = np.arange(n_layers, dtype=np.float64)
        present = nodes > 0
        node_min = np.where(present, layers, np.inf).min(1)
        node_max = np.where(present, layers, -np.inf).max(1)
        longest, shortest = _path_lengths(graph, m)
        table = pd.DataFrame({
            "n_edges": n_edges.astype(np.int64),
            "n_nodes": n_nodes.astype(np.int64),
            "edge_span_mean": span_sum / n_edges,
            "edge_span_max": span_max,
            "edge_layer_mean": layer_sum / n_edges,
            "node_layer_mean": (nodes @ layers) / n_nodes,
            "node_layer_min": np.where(np.isfinite(node_min), node_min, np.nan),
            "node_layer_max": np.where(np.isfinite(node_max), node_max, np.nan),
            "last_third_edge_share": late_sum / n_edges,
            "last_third_node_share": nodes[:, last_third_layers(n_layers)].sum(1) / n_nodes,
            "path_longest": longest,
            "path_shortest": shortest,
        })
    if ids is not None:
        table.index = pd.Index(list(ids), name="id")
    return table
