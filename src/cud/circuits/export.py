"""Converters at the edge of the system: a circuit to EAP-IG / MIB-style JSON and back.

Format (as written by the public EAP-IG ``Graph.to_json``)::

    {"cfg": {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"},
     "nodes": {"input": {"in_graph": bool}, "a0.h0": {...}, ..., "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": float, "in_graph": bool}, ...}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cud.circuits.graph import Graph
from cud.errors import DataError


#: longest file name (bytes) before an id is shortened to a prefix and a hash of the whole id
MAX_NAME = 150


def json_file_name(sample_id: str) -> str:
    """A file name for a sample's circuit that no other id maps to: every character outside
    ``[A-Za-z0-9._-]`` is percent-encoded (``a/b`` -> ``a%2Fb``, ``a b`` -> ``a%20b``, ``%``
    itself -> ``%25``), and a name that would be too long for a file system keeps its first
    characters and gets a hash of the whole id."""
    from urllib.parse import quote
    name = quote(sample_id, safe="")
    if len(name.encode()) > MAX_NAME:
        digest = hashlib.sha256(sample_id.encode()).hexdigest()[:16]
        name = f"{name[:MAX_NAME - 20]}..{digest}"
    return f"{name}.json"


def circuit_to_json(graph: Graph, edge_scores: Tensor, circuit: Tensor) -> dict:
    """One sample: ``edge_scores`` (E,) float, ``circuit`` (E,) bool -> EAP-IG-style dict."""
    scores = edge_scores.detach().float().cpu().numpy()
    in_graph = circuit.detach().bool().cpu().numpy()
    names = graph.edge_names
    edges = {names[e]: {"score": float(scores[e]), "in_graph": bool(in_graph[e])}
             for e in range(graph.n_edges)}
    node_in = np.zeros(graph.n_forward + 1, dtype=bool)
    chosen = np.nonzero(in_graph)[0]
    node_in[graph.edge_parent[chosen]] = True
    owners = graph.backward_owner[graph.edge_child[chosen]]
    node_in[np.where(owners < 0, graph.n_forward, owners)] = True
    nodes = {name: {"in_graph": bool(node_in[i])} for i, name in enumerate(graph.forward_names)}
    nodes["logits"] = {"in_graph": bool(node_in[graph.n_forward])}
    return {"cfg": graph.cfg, "nodes": nodes, "edges": edges}


def write_circuit_json(path: str | Path, graph: Graph, edge_scores: Tensor, circuit: Tensor) -> None:
    Path(path).write_text(json.dumps(circuit_to_json(graph, edge_scores, circuit)))


def circuit_from_json(graph: Graph, path: str | Path) -> tuple[Tensor, Tensor]:
    """Read an EAP-IG-style JSON circuit of the same graph -> (scores (E,), circuit (E,) bool)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        edges = data["edges"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"not an EAP-IG circuit file ({e})", file=str(path)) from None
    scores = torch.zeros(graph.n_edges)
    circuit = torch.zeros(graph.n_edges, dtype=torch.bool)
    lookup = graph.edge_lookup
    for name, value in edges.items():
        if name not in lookup:
            raise DataError(f"edge '{name}' is not in this model's graph", file=str(path),
                            field="edges")
        i = lookup[name]
        scores[i] = float(value.get("score") or 0.0)
        circuit[i] = bool(value.get("in_graph", False))
    return scores, circuit
