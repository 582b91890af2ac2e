"""The CUD score: distances agree with scipy, scores lie in [0, 1], anchors score 0 or 1 against
their own anchor set, and the per-sample table says which anchors were used."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import distance as sd

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings, select
from cud.difficulty.anchors import anchor_circuits, anchors_from_ids
from cud.difficulty.score import (DISTANCES, circuit_weights, cud_from_distances, cud_scores,
                                  distance, score_samples)
from cud.errors import ConfigError

GRAPH = Graph(n_layers=2, n_heads=4)
SEL = SelectionSettings(n_edges=15)


def scores(n, seed=0):
    return torch.randn(n, GRAPH.n_edges, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", range(5))
def test_binary_distances_equal_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.random((4, 40)) < 0.3
    y = rng.random(40) < 0.3
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for i in range(4):
        assert float(distance(xt, yt, "jaccard")[i]) == pytest.approx(sd.jaccard(x[i], y))
        assert float(distance(xt, yt, "hamming")[i]) == pytest.approx(sd.hamming(x[i], y))
        assert float(distance(xt, yt, "cosine")[i]) == pytest.approx(
            sd.cosine(x[i].astype(float), y.astype(float)))


def test_weighted_distances_equal_their_formulas():
    rng = np.random.default_rng(7)
    x, y = rng.random((3, 30)) * (rng.random((3, 30)) < 0.5), rng.random(30)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for i in range(3):
        assert float(distance(xt, yt, "cosine")[i]) == pytest.approx(sd.cosine(x[i], y))
        ruzicka = 1 - np.minimum(x[i], y).sum() / np.maximum(x[i], y).sum()
        assert float(distance(xt, yt, "jaccard")[i]) == pytest.approx(ruzicka)
        assert float(distance(xt, yt, "hamming")[i]) == pytest.approx(np.abs(x[i] - y).mean())


def test_empty_circuits_have_defined_distances():
    zero, one = torch.zeros(1, 5), torch.ones(5)
    for name in DISTANCES:
        assert float(distance(zero, torch.zeros(5), name)[0]) == 0.0
    assert float(distance(zero, one, "cosine")[0]) == 1.0
    assert float(distance(zero, one, "jaccard")[0]) == 1.0
    assert float(cud_from_distances(torch.zeros(1, dtype=torch.float64),
                                    torch.zeros(1, dtype=torch.float64))[0]) == 0.5


def test_unknown_distance_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown distance"):
        distance(torch.zeros(1, 3), torch.zeros(3), "euclid")


nonneg = st.lists(st.floats(0, 10, allow_nan=False), min_size=12, max_size=12)


@settings(max_examples=60, deadline=None)
@given(x=nonneg, e=nonneg, h=nonneg, name=st.sampled_from(DISTANCES))
def test_cud_lies_in_unit_interval(x, e, h, name):
    xt = torch.tensor([x], dtype=torch.float64)
    # scaled to [0, 1] as circuit_weights does, and as 0/1 circuits
    for transform in (lambda v: v / max(1e-9, float(v.max())), lambda v: (v > 5).double()):
        d_e = distance(transform(xt), transform(torch.tensor(e, dtype=torch.float64)), name)
        d_h = distance(transform(xt), transform(torch.tensor(h, dtype=torch.float64)), name)
        assert 0 <= float(d_e[0]) <= 1 and 0 <= float(d_h[0]) <= 1
        cud = float(cud_from_distances(d_e, d_h)[0])
        assert 0.0 <= cud <= 1.0


@pytest.mark.parametrize("name", DISTANCES)
@pytest.mark.parametrize("weighted", [False, True])
def test_an_anchor_scores_0_or_1_against_its_own_anchor_set(name, weighted):
    s = scores(6, seed=1)
    ids = [f"s{i}" for i in range(6)]
    anchors = anchors_from_ids(["s0"], ["s1"])
    ac = anchor_circuits(anchors, ids, s, GRAPH, SEL)
    cud, d_e, d_h = cud_scores(s, ac, distance_name=name, weighted=weighted)
    assert float(d_e[0]) == pytest.approx(0, abs=1e-12) and float(d_h[0]) > 0
    assert float(cud[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(d_h[1]) == pytest.approx(0, abs=1e-12) and float(d_e[1]) > 0
    assert float(cud[1]) == pytest.approx(1.0, abs=1e-12)
    assert ((cud >= 0) & (cud <= 1)).all()


def test_anchor_circuit_is_the_selection_of_the_mean_scores():
    s = scores(8, seed=2)
    ids = [f"s{i}" for i in range(8)]
    ac = anchor_circuits(anchors_from_ids(["s0", "s2", "s4"], ["s1", "s3"]), ids, s, GRAPH, SEL)
    expected = select(GRAPH, s[[0, 2, 4]].mean(0, keepdim=True), SEL)[0]
    assert torch.equal(ac.easy_circuit, expected)
    assert int(ac.hard_circuit.sum()) == SEL.n_edges


def test_weights_are_scaled_per_circuit():
    s = scores(3, seed=3)
    c = select(GRAPH, s, SEL)
    w = circuit_weights(s * 100, c)
    assert torch.allclose(w, circuit_weights(s, c))
    assert torch.allclose(w.amax(1), torch.ones(3, dtype=torch.float64))
    assert ((w > 0) == c).all()


def test_score_table_names_the_anchors_used():
    s = scores(5, seed=4)
    ids = [f"s{i}" for i in range(5)]
    anchors = anchors_from_ids(["s0"], ["s1"], name="mine")
    ac = anchor_circuits(anchors, ids, s, GRAPH, SEL)
    table = score_samples(ids, s, ac, distance_name="jaccard")
    assert list(table.columns[:4]) == ["id", "cud", "d_E", "d_H"]
    assert table["anchors"].nunique() == 1
    assert table["anchors"].iloc[0] == f"mine#{anchors.fingerprint}"
    assert list(table["anchor_role"]) == ["easy", "hard", "", "", ""]
    # another size re-selects both sides
    small = score_samples(ids, s, ac, selection=SelectionSettings(n_edges=5))
    assert (small["n_edges"] == 5).all()
    assert small["cud"].iloc[0] == pytest.approx(0.0, abs=1e-12)


def test_cosine_and_hamming_rank_alike_on_equal_size_binary_circuits():
    # |A| = |B| = n: cosine distance 1 - |A∩B|/n, Hamming 2(n - |A∩B|)/E, so CUD is identical
    s = scores(10, seed=5)
    ids = [f"s{i}" for i in range(10)]
    ac = anchor_circuits(anchors_from_ids(["s0", "s1"], ["s2", "s3"]), ids, s, GRAPH, SEL)
    cos, _, _ = cud_scores(s, ac, distance_name="cosine")
    ham, _, _ = cud_scores(s, ac, distance_name="hamming")
    assert torch.allclose(cos, ham)
    wcos, _, _ = cud_scores(s, ac, distance_name="cosine", weighted=True)
    wham, _, _ = cud_scores(s, ac, distance_name="hamming", weighted=True)
    assert not torch.allclose(wcos, wham)  # weighted circuits break the tie
