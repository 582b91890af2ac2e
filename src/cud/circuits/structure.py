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

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

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

_CHUNK = 64  # circuits per block: bounds the (chunk, E) float work arrays


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
    return array != 0


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


def _incidence(groups: np.ndarray, n_groups: int) -> sparse.csr_matrix:
    """(len(groups), n_groups) 0/1 sparse matrix; a negative group is left out."""
    keep = np.nonzero(groups >= 0)[0]
    return sparse.csr_matrix((np.ones(len(keep), dtype=np.float32), (keep, groups[keep])),
                             shape=(len(groups), n_groups))


def _group_counts(block: np.ndarray, incidence: sparse.csr_matrix) -> np.ndarray:
    """(n, E) bool @ (E, G) incidence -> (n, G) counts."""
    return np.asarray((incidence.T @ block.T.astype(np.float32)).T)


def _node_incidence(graph: Graph) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """(E, F) incidences of each edge's parent and of its reader's owner (logits left out)."""
    cache = graph._cache
    if "structure_node_incidence" not in cache:
        owner = graph.backward_owner[graph.edge_child]
        cache["structure_node_incidence"] = (_incidence(graph.edge_parent, graph.n_forward),
                                             _incidence(owner, graph.n_forward))
    return cache["structure_node_incidence"]


def node_membership(graph: Graph, circuits) -> np.ndarray:
    """(N, F) bool: which forward nodes each circuit touches (as a parent or as the owner of a
    reader). Column 0 is ``input``; ``logits`` is not a forward node."""
    circuits = as_circuits(circuits, graph)
    parent, owner = _node_incidence(graph)
    out = np.zeros((len(circuits), graph.n_forward), dtype=bool)
    for start in range(0, len(circuits), _CHUNK):
        block = circuits[start:start + _CHUNK]
        out[start:start + _CHUNK] = (_group_counts(block, parent)
                                     + _group_counts(block, owner)) > 0
    return out


def node_layer_counts(graph: Graph, circuits) -> np.ndarray:
    """(N, L) int: internal nodes (heads and MLPs) of each circuit per layer."""
    members = node_membership(graph, circuits)[:, 1:]          # drop input
    layers = graph.forward_layer[1:]
    out = np.zeros((len(members), graph.n_layers), dtype=np.int64)
    for layer in range(graph.n_layers):
        out[:, layer] = members[:, layers == layer].sum(1)
    return out


def edge_layer_counts(graph: Graph, circuits) -> np.ndarray:
    """(N, L + 1) int: edges of each circuit by the layer of their reader; the last column is
    ``logits``."""
    circuits = as_circuits(circuits, graph)
    incidence = _incidence(edge_layer(graph), graph.n_layers + 1)
    out = np.zeros((len(circuits), graph.n_layers + 1), dtype=np.int64)
    for start in range(0, len(circuits), _CHUNK):
        out[start:start + _CHUNK] = np.rint(_group_counts(circuits[start:start + _CHUNK],
                                                          incidence))
    return out


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
    cell = edge_layer(graph) * size + (graph.forward_layer[graph.edge_parent] + 1)
    incidence = _incidence(cell, size * size)
    counts = np.asarray((incidence.T @ weights.T).T)
    return counts.reshape(len(weights), size, size)


def path_lengths(graph: Graph, circuits) -> tuple[np.ndarray, np.ndarray]:
    """Longest and shortest input-to-logits path of each circuit, in edges (see the module
    docstring); ((N,), (N,)) float, NaN where a circuit has no such path.

    One pass over the forward nodes in index order, which is topological (a node reads only
    nodes of smaller index), carrying for every circuit at once the longest and shortest path
    from ``input`` to each node's output."""
    circuits = as_circuits(circuits, graph)
    n = len(circuits)
    parents = graph.edge_parent
    into_node = _edges_into_nodes(graph)
    longest = np.full((n, graph.n_forward), -np.inf)
    shortest = np.full((n, graph.n_forward), np.inf)
    longest[:, 0] = shortest[:, 0] = 0

    def step(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        on = circuits[:, edges]
        up = parents[edges]
        hi = np.where(on, longest[:, up] + 1, -np.inf).max(1) if len(edges) else \
            np.full(n, -np.inf)
        lo = np.where(on, shortest[:, up] + 1, np.inf).min(1) if len(edges) else \
            np.full(n, np.inf)
        return hi, lo

    for node in range(1, graph.n_forward):
        longest[:, node], shortest[:, node] = step(into_node[node])
    hi, lo = step(graph.incoming_edges[graph.logits_backward])
    hi = np.where(np.isfinite(hi), hi, np.nan)
    lo = np.where(np.isfinite(lo), lo, np.nan)
    return hi, lo


def _edges_into_nodes(graph: Graph) -> list[np.ndarray]:
    """For each forward node, the edges into any of its readers (q, k, v or the MLP input)."""
    cache = graph._cache
    if "structure_edges_into_nodes" not in cache:
        cache["structure_edges_into_nodes"] = [
            np.concatenate([graph.incoming_edges[b] for b in readers]).astype(np.int64)
            if len(readers) else np.zeros(0, dtype=np.int64)
            for readers in graph.readers_of]
    return cache["structure_edges_into_nodes"]


def structure_statistics(graph: Graph, circuits, ids: Sequence[str] | None = None
                         ) -> pd.DataFrame:
    """One row per circuit, one column per statistic of :data:`STATISTICS` (definitions in the
    module docstring). Index: ``ids`` (named ``id``) when given, else 0..N-1.

    ``circuits``: (N, E) or (E,) bool (or float: nonzero = in the circuit), numpy or torch."""
    circuits = as_circuits(circuits, graph)
    n, n_layers = len(circuits), graph.n_layers
    if ids is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} circuits")
    span = edge_span(graph).astype(np.float64)
    reader_layer = edge_layer(graph).astype(np.float64)
    late_layer = np.append(last_third_layers(n_layers), True)       # + logits
    late_edge = late_layer[edge_layer(graph)]

    n_edges = circuits.sum(1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        span_sum = np.zeros(n)
        layer_sum = np.zeros(n)
        late_sum = np.zeros(n)
        span_max = np.full(n, np.nan)
        for start in range(0, n, _CHUNK):
            block = circuits[start:start + _CHUNK]
            rows = slice(start, start + len(block))
            span_sum[rows] = block @ span
            layer_sum[rows] = block @ reader_layer
            late_sum[rows] = block @ late_edge.astype(np.float64)
            span_max[rows] = np.where(block, span, -np.inf).max(1)
        span_max[~np.isfinite(span_max)] = np.nan

        nodes = node_layer_counts(graph, circuits).astype(np.float64)   # (N, L)
        n_nodes = nodes.sum(1)
        layers = np.arange(n_layers, dtype=np.float64)
        present = nodes > 0
        node_min = np.where(present, layers, np.inf).min(1)
        node_max = np.where(present, layers, -np.inf).max(1)
        longest, shortest = path_lengths(graph, circuits)
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
