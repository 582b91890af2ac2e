"""CUD variants beyond the paper's (issue: could circuits be made informative?), each a score per
sample from the same per-sample edge scores and the same anchor set, judged exactly as the
paper's CUD is:

- ``cud``: binary circuits of the circuits' own size (greedy, 1000 edges by default), cosine
  distance, CUD = d_E / (d_E + d_H) to the two averaged anchor circuits;
- ``cud_paper``: the same at the paper's 75 edges;
- ``cud_weighted``: the circuits weighted by |edge score|;
- ``cud_n{N}``: binary circuits of N edges;
- ``cud_faithful``: the smallest circuit size whose median faithfulness over the pool reaches
  :attr:`~cud.difficulty.study.StudySettings.faithfulness_target` (needs the faithfulness of
  several sizes in the circuits folder);
- ``cud_nodes``: node-level circuits: each node scored by the summed |score| of its outgoing
  edges, the top :attr:`node_k` nodes kept;
- ``cud_set_mean`` / ``cud_set_knn``: anchors as a set: d_E is the mean (or the mean of the k
  nearest) distance to the easy anchor samples' *own* circuits instead of to one averaged
  circuit;
- ``cud_{name}``: the paper's CUD on other circuits of the same samples (e.g. ``logprob``
  attribution).

:class:`CircuitData` holds what every variant reads, computed once for all anchor pools.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings, select
from cud.difficulty.anchors import AnchorSet, anchor_circuits
from cud.difficulty.score import cud_from_distances, cud_scores, distance


#: the paper's circuit size (greedy, 75 edges) and the name of CUD at that size
PAPER_SIZE, PAPER = 75, "cud_paper"


@dataclass
class CircuitData:
    """Per-sample circuit data every variant reads: ``edge_scores`` (N, E) and the binary
    circuits at each size (``circuits[n]``, greedy, or ``selection``'s own at its size),
    node scores (N, F), the faithfulness table (index id, one column per size, may be empty)
    and other circuits of the same samples (``others[name]``)."""

    ids: list[str]
    graph: Graph
    edge_scores: Tensor
    selection: SelectionSettings
    circuits: dict[int, Tensor] = field(default_factory=dict)
    faithfulness: pd.DataFrame = field(default_factory=pd.DataFrame)
    others: dict[str, "CircuitData"] = field(default_factory=dict)
    _nodes: Tensor | None = None

    @classmethod
    def build(cls, ids: Sequence[str], graph: Graph, edge_scores: Tensor,
              selection: SelectionSettings, circuits: Tensor | None, sizes: Sequence[int] = (),
              faithfulness: pd.DataFrame | None = None,
              others: Mapping[str, "CircuitData"] | None = None) -> "CircuitData":
        """The circuits of ``selection`` (``circuits`` when given) and greedy ones of every
        size in ``sizes``, each selected once."""
        own = circuits if circuits is not None else select(graph, edge_scores, selection)
        data = cls(list(ids), graph, edge_scores.float(), selection,
                   faithfulness=faithfulness if faithfulness is not None else pd.DataFrame(),
                   others=dict(others or {}))
        data.circuits[data.size] = own
        for n in sizes:
            if n not in data.circuits:
                data.circuits[n] = select(graph, edge_scores, replace(
                    selection, selection="greedy" if selection.selection == "threshold"
                    else selection.selection, n_edges=n))
        return data

    @property
    def size(self) -> int:
        return self.selection.n_edges

    def selection_at(self, n: int) -> SelectionSettings:
        if n == self.size:
            return self.selection
        return replace(self.selection, selection="greedy" if self.selection.selection ==
                       "threshold" else self.selection.selection, n_edges=n)

    @property
    def node_scores(self) -> Tensor:
        """(N, F): each forward node's summed |score| over its outgoing edges."""
        if self._nodes is None:
            parent = torch.as_tensor(self.graph.edge_parent, dtype=torch.long)
            self._nodes = torch.zeros(len(self.ids), self.graph.n_forward).index_add_(
                1, parent, self.edge_scores.abs())
        return self._nodes


def _series(values, ids) -> pd.Series:
    v = values.numpy() if isinstance(values, Tensor) else np.asarray(values)
    return pd.Series(v.astype(float), index=pd.Index(list(ids), name="id"))


def cud_at(data: CircuitData, anchors: AnchorSet, n: int | None = None,
           distance_name: str = "cosine", weighted: bool = False) -> pd.Series:
    """CUD of every sample with circuits of ``n`` edges (default: the data's own size) and the
    anchors' averaged circuits selected the same way."""
    n = n or data.size
    sel = data.selection_at(n)
    ac = anchor_circuits(anchors, data.ids, data.edge_scores, data.graph, sel)
    cud, _, _ = cud_scores(data.edge_scores, ac, distance_name=distance_name, weighted=weighted,
                           circuits=data.circuits[n], selection=sel)
    return _series(cud, data.ids)


def node_cud(data: CircuitData, anchors: AnchorSet, k: int) -> pd.Series:
    """CUD on node circuits: each sample's (and each anchor side's averaged) top-``k`` nodes by
    summed |outgoing edge score|, binary, cosine distance."""
    scores = data.node_scores
    k = max(1, min(k, scores.shape[1]))

    def top(rows: Tensor) -> Tensor:
        out = torch.zeros_like(rows, dtype=torch.bool)
        return out.scatter_(1, rows.topk(k, dim=1).indices, True)

    where = {i: r for r, i in enumerate(data.ids)}
    easy = top(scores[[where[i] for i in anchors.easy]].mean(0, keepdim=True))[0]
    hard = top(scores[[where[i] for i in anchors.hard]].mean(0, keepdim=True))[0]
    mine = top(scores)
    return _series(cud_from_distances(distance(mine, easy), distance(mine, hard)), data.ids)


def set_cud(data: CircuitData, anchors: AnchorSet, mode: str = "mean", k: int = 3
            ) -> pd.Series:
    """CUD with anchors as a set: d_E = the mean (``mode="mean"``) or the mean of the ``k``
    smallest (``"knn"``) cosine distances between a sample's circuit and the easy anchor
    samples' own circuits; d_H likewise. An anchor's distance to itself is left out."""
    circuits = data.circuits[data.size].double()
    where = {i: r for r, i in enumerate(data.ids)}
    norms = circuits.norm(dim=1).clamp_min(1e-12)

    def side(ids: list[str]) -> Tensor:
        rows = torch.tensor([where[i] for i in ids])
        cos = (circuits @ circuits[rows].T) / (norms[:, None] * norms[rows][None])
        d = (1 - cos).clamp(0, 1)
        d[rows, torch.arange(len(rows))] = float("nan")  # not the anchor itself
        if mode == "knn":
            d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
            kk = max(1, min(k, len(rows) - 1 if len(rows) > 1 else 1))
            d = d.topk(kk, dim=1, largest=False).values
            d = torch.where(torch.isinf(d), torch.full_like(d, float("nan")), d)
        return torch.nanmean(d, dim=1)

    d_e, d_h = side(anchors.easy), side(anchors.hard)
    return _series(cud_from_distances(torch.nan_to_num(d_e, nan=0.0),
                                      torch.nan_to_num(d_h, nan=0.0)), data.ids)


def faithful_size(data: CircuitData, pool: Sequence[str], target: float) -> int | None:
    """The smallest size (in the faithfulness table: one column per circuit size, int names)
    whose median faithfulness over the ``pool`` samples reaches ``target``; the largest size
    when none does; None without a faithfulness table."""
    table = data.faithfulness
    if table is None or table.empty:
        return None
    sizes = sorted(int(c) for c in table.columns if int(c) in data.circuits)
    if not sizes:
        return None
    medians = table.reindex([i for i in pool if i in table.index])[sizes].median()
    for n, m in zip(sizes, medians):
        if np.isfinite(m) and m >= target:
            return n
    return sizes[-1]


def variant_scores(data: CircuitData, anchors: AnchorSet, pool: Sequence[str], *,
                   sizes: Sequence[int], node_k: int, knn: int, faithfulness_target: float
                   ) -> tuple[dict[str, pd.Series], dict]:
    """Every variant's scores for one anchor set (see the module docstring) and what was chosen
    along the way (the faithfulness-chosen size)."""
    out = {"cud": cud_at(data, anchors), "cud_weighted": cud_at(data, anchors, weighted=True)}
    for n in sizes:
        if n != data.size:
            out[PAPER if n == PAPER_SIZE else f"cud_n{n}"] = cud_at(data, anchors, n)
    info = {}
    n_faith = faithful_size(data, pool, faithfulness_target)
    if n_faith is not None:
        out["cud_faithful"] = cud_at(data, anchors, n_faith)
        info["faithful_size"] = n_faith
    out["cud_nodes"] = node_cud(data, anchors, node_k)
    out["cud_set_mean"] = set_cud(data, anchors, "mean")
    out["cud_set_knn"] = set_cud(data, anchors, "knn", knn)
    for name, other in data.others.items():
        out[f"cud_{name}"] = cud_at(other, anchors)
    return out, info
