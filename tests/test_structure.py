"""Structure statistics of circuits: handmade circuits with known answers, a brute-force path
search, and real circuits of a tiny model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cud.circuits.graph import Graph
from cud.circuits.structure import (STATISTICS, edge_layer_counts, edge_span, last_third_layers,
                                    layer_pair_counts, node_layer_counts, node_membership,
                                    path_lengths, structure_statistics)

G = Graph(n_layers=4, n_heads=2)


def circuit(*names, graph=G):
    c = np.zeros(graph.n_edges, dtype=bool)
    for name in names:
        c[graph.edge_lookup[name]] = True
    return c


DIRECT = circuit("input->logits")
LAST_LAYER = circuit("input->a3.h0<q>", "input->a3.h0<v>", "a3.h0->m3", "input->m3",
                     "a3.h0->logits", "m3->logits")
CHAIN = circuit("input->a0.h0<q>", "a0.h0->a1.h1<k>", "a1.h1->m2", "m2->logits",
                "input->logits")
DANGLING = circuit("a1.h1->m2", "m2->logits")          # never reaches input


def test_edge_span_is_reader_layer_minus_writer_layer():
    span = edge_span(G)
    assert span[G.edge_lookup["input->logits"]] == G.n_layers + 1
    assert span[G.edge_lookup["a0.h0->m0"]] == 0
    assert span[G.edge_lookup["a2.h1->a3.h0<v>"]] == 1
    assert span[G.edge_lookup["input->a0.h1<k>"]] == 1
    assert span.min() == 0 and span.max() == G.n_layers + 1


@pytest.mark.parametrize("n_layers, expected", [(1, [0]), (2, [1]), (4, [3]), (12, [8, 9, 10, 11]),
                                                 (30, list(range(20, 30)))])
def test_last_third_layers(n_layers, expected):
    assert np.nonzero(last_third_layers(n_layers))[0].tolist() == expected


def test_known_circuits():
    stats = structure_statistics(G, np.stack([DIRECT, LAST_LAYER, CHAIN, DANGLING]),
                                 ids=["direct", "last", "chain", "dangling"])
    assert list(stats.columns) == list(STATISTICS)
    assert stats.index.name == "id"
    d, last, chain, dangling = (stats.loc[k] for k in ("direct", "last", "chain", "dangling"))

    assert d["n_edges"] == 1 and d["n_nodes"] == 0
    assert d["edge_span_mean"] == d["edge_span_max"] == 5
    assert np.isnan(d["node_layer_mean"]) and np.isnan(d["last_third_node_share"])
    assert d["path_longest"] == d["path_shortest"] == 1

    # everything in the last layer: last-third shares 1
    assert last["last_third_edge_share"] == 1 and last["last_third_node_share"] == 1
    assert last["node_layer_min"] == last["node_layer_max"] == 3
    assert last["n_nodes"] == 2
    # input->a3.h0->m3->logits (3 edges) is the longest; input->m3->logits the shortest
    assert last["path_longest"] == 3 and last["path_shortest"] == 2
    # spans: input->a3 4, 4; a3->m3 0; input->m3 4; a3->logits 1; m3->logits 1
    assert last["edge_span_mean"] == pytest.approx(14 / 6)

    # chain: input->a0.h0->a1.h1->m2->logits (4 edges) and the direct edge (1)
    assert chain["path_longest"] == 4 and chain["path_shortest"] == 1
    assert chain["node_layer_mean"] == pytest.approx(1.0)       # layers 0, 1, 2
    assert chain["last_third_node_share"] == 0
    assert chain["last_third_edge_share"] == pytest.approx(2 / 5)  # two edges into logits
    assert chain["edge_layer_mean"] == pytest.approx((0 + 1 + 2 + 4 + 4) / 5)

    assert np.isnan(dangling["path_longest"]) and np.isnan(dangling["path_shortest"])


def test_a_path_must_leave_the_node_it_entered():
    # input feeds a0.h0 and a1.h1 leads to logits, but nothing joins a0.h0 to a1.h1
    broken = circuit("input->a0.h0<q>", "a1.h1->logits", "input->m3", "m3->logits")
    longest, shortest = path_lengths(G, broken)
    assert longest[0] == shortest[0] == 2


def test_layer_counts_and_pairs_add_up():
    circuits = np.stack([DIRECT, LAST_LAYER, CHAIN])
    by_layer = edge_layer_counts(G, circuits)
    assert by_layer.shape == (3, G.n_layers + 1)
    assert by_layer.sum(1).tolist() == circuits.sum(1).tolist()
    assert by_layer[0].tolist() == [0, 0, 0, 0, 1]
    pairs = layer_pair_counts(G, circuits)
    assert pairs.shape == (3, G.n_layers + 1, G.n_layers + 1)
    assert pairs.sum((1, 2)).tolist() == circuits.sum(1).tolist()
    assert pairs[0, G.n_layers, 0] == 1                       # input -> logits
    # no edge reads from a later layer than its writer's: nothing above the diagonal r = c - 1
    rows, cols = np.nonzero(pairs.sum(0))
    assert (rows >= cols - 1).all()
    # the span read off the matrix equals edge_span_mean
    r, c = np.indices(pairs.shape[1:])
    span_from_pairs = (pairs * (r - (c - 1))).sum((1, 2)) / circuits.sum(1)
    stats = structure_statistics(G, circuits)
    assert np.allclose(span_from_pairs, stats["edge_span_mean"])
    nodes = node_layer_counts(G, circuits)
    assert nodes[2].tolist() == [1, 1, 1, 0]


def _all_paths(graph, c):
    """Brute force: every input-to-logits path of circuit c, as edge counts."""
    edges = np.nonzero(c)[0]
    owner = graph.backward_owner
    out_of = {}
    for e in edges:
        out_of.setdefault(int(graph.edge_parent[e]), []).append(int(e))
    lengths = []

    def walk(node, depth):
        for e in out_of.get(node, []):
            reader_owner = owner[graph.edge_child[e]]
            if reader_owner < 0:
                lengths.append(depth + 1)
            else:
                walk(int(reader_owner), depth + 1)

    walk(0, 0)
    return lengths


SMALL = Graph(n_layers=3, n_heads=2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=SMALL.n_edges, max_size=SMALL.n_edges),
       st.floats(0.05, 0.6))
def test_path_lengths_match_brute_force(bits, keep):
    # thin the random circuit so that both connected and broken circuits occur
    rng = np.random.default_rng(sum(bits))
    c = np.array(bits) & (rng.random(SMALL.n_edges) < keep)
    longest, shortest = path_lengths(SMALL, c)
    found = _all_paths(SMALL, c)
    if found:
        assert longest[0] == max(found) and shortest[0] == min(found)
    else:
        assert np.isnan(longest[0]) and np.isnan(shortest[0])


def test_batch_equals_one_at_a_time():
    rng = np.random.default_rng(0)
    circuits = rng.random((7, G.n_edges)) < 0.15
    together = structure_statistics(G, circuits)
    for k in range(len(circuits)):
        alone = structure_statistics(G, circuits[k])
        np.testing.assert_allclose(together.iloc[k].to_numpy(float),
                                   alone.iloc[0].to_numpy(float), equal_nan=True)


def test_accepts_torch_and_float_circuits():
    as_bool = structure_statistics(G, np.stack([CHAIN, LAST_LAYER]))
    as_torch = structure_statistics(G, torch.tensor(np.stack([CHAIN, LAST_LAYER])))
    as_scores = structure_statistics(G, np.stack([CHAIN, LAST_LAYER]) * 0.3)
    assert as_bool.equals(as_torch)
    np.testing.assert_allclose(as_bool.to_numpy(float), as_scores.to_numpy(float),
                               equal_nan=True)


def test_shape_errors():
    with pytest.raises(ValueError, match="edges|circuits must be"):
        structure_statistics(G, np.zeros((2, G.n_edges + 1), dtype=bool))
    with pytest.raises(ValueError, match="ids"):
        structure_statistics(G, np.zeros((2, G.n_edges), dtype=bool), ids=["a"])


def test_real_circuits_of_a_tiny_model():
    from cud.circuits.attribution import AttributionSettings, attribute
    from cud.circuits.ablation import CorruptAblation
    from cud.circuits.runner import ResidualRunner
    from cud.circuits.selection import SelectionSettings, select
    from cud.data import batches, encode_samples, fictitious_authors
    from cud.models import tiny_model

    lm = tiny_model("llama", num_hidden_layers=3)
    runner = ResidualRunner(lm.adapter)
    graph = runner.graph
    batch = next(iter(batches(encode_samples(lm.tokenizer, fictitious_authors(6)), 6,
                              lm.pad_token_id)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model runs fastest on one thread
    try:
        scores = attribute(runner, batch, CorruptAblation(lm.tokenizer),
                           AttributionSettings(steps=2)).edge_scores
    finally:
        torch.set_num_threads(threads)
    circuits = select(graph, scores, SelectionSettings(n_edges=20))
    stats = structure_statistics(graph, circuits, ids=batch.ids)
    assert (stats["n_edges"] == circuits.sum(1).numpy()).all()
    # a greedy circuit grows from logits: each has an edge into logits, so its edge share in
    # the last third (which holds logits) is positive
    assert (edge_layer_counts(graph, circuits)[:, -1] > 0).all()
    assert (stats["last_third_edge_share"] > 0).all()
    assert stats["edge_span_mean"].between(0, graph.n_layers + 1).all()
    members = node_membership(graph, circuits)
    assert (members.sum(1) - members[:, 0] == stats["n_nodes"]).all()
    complete = stats["path_longest"].notna()
    assert (stats.loc[complete, "path_longest"] >= stats.loc[complete, "path_shortest"]).all()
    assert (stats.loc[complete, "path_shortest"] >= 1).all()
