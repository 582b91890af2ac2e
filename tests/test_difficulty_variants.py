"""CUD variants and test-retest on planted circuits: each variant is the quantity its name says,
and a measurement agrees with itself exactly when its circuits are the same."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings
from cud.difficulty.anchors import anchor_circuits, anchors_from_ids
from cud.difficulty.retest import circuit_agreement, retest_table
from cud.difficulty.score import cud_scores
from cud.difficulty.variants import (CircuitData, cud_at, faithful_size, node_cud, set_cud,
                                     variant_scores)

GRAPH = Graph(n_layers=2, n_heads=4)
SEL = SelectionSettings(n_edges=12)
N = 20


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    easy, hard = torch.randn(GRAPH.n_edges, generator=g), torch.randn(GRAPH.n_edges, generator=g)
    t = torch.linspace(0, 1, N)
    scores = (1 - t)[:, None] * easy + t[:, None] * hard \
        + 0.2 * torch.randn(N, GRAPH.n_edges, generator=g)
    ids = [f"a{i:02d}.x" for i in range(N)]
    faith = pd.DataFrame({12: np.linspace(0.1, 0.3, N), 24: np.linspace(0.4, 0.8, N)},
                         index=pd.Index(ids, name="id"))
    return CircuitData.build(ids, GRAPH, scores, SEL, None, sizes=(24,), faithfulness=faith)


@pytest.fixture(scope="module")
def anchors(data):
    return anchors_from_ids(data.ids[:3], data.ids[-3:])


def test_cud_at_the_own_size_is_the_papers_cud(data, anchors):
    ac = anchor_circuits(anchors, data.ids, data.edge_scores, GRAPH, SEL)
    expected, _, _ = cud_scores(data.edge_scores, ac)
    np.testing.assert_allclose(cud_at(data, anchors).to_numpy(), expected.numpy())
    assert (data.circuits[24].sum(1) == 24).all() and (data.circuits[12].sum(1) == 12).all()
    # the planted difficulty is the mixing weight: CUD rises along it
    assert cud_at(data, anchors).iloc[5:-5].is_monotonic_increasing or \
        np.corrcoef(cud_at(data, anchors), np.arange(N))[0, 1] > 0.8


def test_anchors_as_a_set_use_the_anchors_own_circuits(data, anchors):
    mean = set_cud(data, anchors, "mean")
    knn = set_cud(data, anchors, "knn", k=1)
    assert mean.between(0, 1).all() and knn.between(0, 1).all()
    c = data.circuits[12].double()
    cos = (c @ c.T) / (c.norm(dim=1)[:, None] * c.norm(dim=1)[None])
    d = 1 - cos
    i = 8  # not an anchor: its mean distance to the three easy anchors' own circuits
    d_e, d_h = d[i, :3].mean(), d[i, -3:].mean()
    assert mean.iloc[i] == pytest.approx(float(d_e / (d_e + d_h)))
    d_e1, d_h1 = d[i, :3].min(), d[i, -3:].min()
    assert knn.iloc[i] == pytest.approx(float(d_e1 / (d_e1 + d_h1)))
    # an anchor is not its own neighbour
    d0 = d[0, 1:3].min()
    assert knn.iloc[0] == pytest.approx(float(d0 / (d0 + d[0, -3:].min())))


def test_node_circuits_and_faithfulness_chosen_size(data, anchors):
    nodes = node_cud(data, anchors, k=5)
    assert nodes.between(0, 1).all() and nodes.iloc[-1] > nodes.iloc[0]
    assert data.node_scores.shape == (N, GRAPH.n_forward)
    assert faithful_size(data, data.ids, 0.2) == 12       # median 0.2 at 12 edges
    assert faithful_size(data, data.ids, 0.5) == 24
    assert faithful_size(data, data.ids, 0.99) == 24      # none reaches it: the largest
    scores, info = variant_scores(data, anchors, data.ids, sizes=(24,), node_k=5, knn=2,
                                  faithfulness_target=0.5)
    assert info["faithful_size"] == 24
    assert {"cud", "cud_weighted", "cud_n24", "cud_faithful", "cud_nodes", "cud_set_mean",
            "cud_set_knn"} == set(scores)
    pd.testing.assert_series_equal(scores["cud_faithful"], scores["cud_n24"])


def test_retest_of_identical_circuits_is_one_and_of_noisy_ones_less(data, anchors):
    same = retest_table(data, data, anchors, {"cud": (cud_at(data, anchors),
                                                     cud_at(data, anchors))}, n_boot=50)
    row = same.set_index("quantity")
    assert row.loc["cud test-retest spearman", "value"] == pytest.approx(1.0)
    assert row.loc["jaccard_same_sample", "value"] == pytest.approx(1.0)
    assert row.loc["cud test-retest spearman", "n"] == N - 6  # the anchors left out
    g = torch.Generator().manual_seed(9)
    noisy = CircuitData.build(data.ids, GRAPH,
                              data.edge_scores + 0.8 * torch.randn(N, GRAPH.n_edges,
                                                                   generator=g), SEL, None)
    agree = circuit_agreement(data, noisy)
    assert agree["jaccard_same_sample"] < 1 and \
        agree["jaccard_same_sample"] > agree["jaccard_other_samples"]
    other = retest_table(data, noisy, anchors, {"cud": (cud_at(data, anchors),
                                                       cud_at(noisy, anchors))}, n_boot=50)
    rho = other.set_index("quantity").loc["cud test-retest spearman", "value"]
    assert 0 < rho < 1
