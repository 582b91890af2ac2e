"""Circuits as EAP-IG / MIB JSON (METHOD §1 names): the names of the public tooling, and a lossless
round trip of scores and circuit."""

from __future__ import annotations

import json

import pytest
import torch

from cud.circuits.export import circuit_from_json, circuit_to_json, write_circuit_json
from cud.circuits.graph import Graph
from cud.circuits.runner import ResidualRunner
from cud.circuits.selection import SelectionSettings, select
from cud.errors import DataError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_node_and_edge_names_follow_eap_ig():
    g = Graph(2, 4, False, 32)
    assert g.forward_names == ["input", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0",
                               "a1.h0", "a1.h1", "a1.h2", "a1.h3", "m1"]
    assert g.backward_names[:5] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.h0<k>"]
    assert g.backward_names[12:14] == ["m0", "a1.h0<q>"]
    assert g.backward_names[-2:] == ["m1", "logits"]
    names = set(g.edge_names)
    for present in ["input->a0.h1<k>", "input->m0", "input->logits", "a0.h1->m0", "a0.h3->a1.h0<q>",
                    "m0->a1.h2<v>", "m0->m1", "a1.h3->logits", "m1->logits", "a0.h0->m1"]:
        assert present in names, present
    for absent in ["a0.h0->a0.h1<q>", "m0->a0.h0<q>", "a1.h0->m0", "m1->a1.h0<k>", "logits->m1"]:
        assert absent not in names, absent
    # edge index space: row-major over (forward, backward), as EAP-IG's real_edge_mask
    assert g.edge_names[0] == "input->a0.h0<q>"
    assert g.edge_names[-1] == "m1->logits"
    assert len(names) == g.n_edges


@pytest.mark.parametrize("layers, heads, parallel, n_edges", [
    (2, 4, False, 110), (2, 4, True, 102), (1, 1, False, 8), (3, 2, True, 94)])
def test_edge_count(layers, heads, parallel, n_edges):
    """Sequential: heads of layer l read 1 + l(H+1) nodes through 3H inputs, the MLP also reads
    that layer's heads; parallel: the MLP reads what the heads read; logits read everything."""
    g = Graph(layers, heads, parallel, 8)
    expected = sum((1 + l * (heads + 1)) * 3 * heads
                   + 1 + l * (heads + 1) + (0 if parallel else heads) for l in range(layers))
    assert g.n_edges == expected + g.n_forward == n_edges
    assert ("a0.h0->m0" in g.edge_lookup) == (not parallel)


def test_graph_of_a_model(family, make_lm):
    g = ResidualRunner(make_lm(family).adapter).graph
    assert (g.n_layers, g.n_heads, g.d_model) == (2, 4, 32)
    parallel = family in ("gpt_neox", "phi")  # the MLP reads the stream before the attention
    assert g.parallel_attn_mlp == parallel
    assert ("a1.h0->m1" in g.edge_lookup) == (not parallel)


@pytest.fixture(params=[(2, 4, False), (2, 4, True), (3, 2, True)], ids=str)
def graph(request):
    return Graph(*request.param, d_model=16)


def test_json_round_trip(graph, tmp_path):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, graph.n_edges, generator=gen) * torch.logspace(-8, 2, graph.n_edges)
    circuits = select(graph, scores, SelectionSettings("greedy", 13))
    for i in range(2):
        path = tmp_path / f"circuit{i}.json"
        write_circuit_json(path, graph, scores[i], circuits[i])
        back_scores, back_circuit = circuit_from_json(graph, path)
        assert back_scores.dtype == torch.float32
        assert torch.equal(back_scores, scores[i])  # exact: float32 survives JSON's float64
        assert torch.equal(back_circuit, circuits[i])
        assert json.loads(path.read_text()) == circuit_to_json(graph, scores[i], circuits[i])


def test_json_content(graph):
    scores = torch.arange(graph.n_edges, dtype=torch.float32) - 3.5
    circuit = select(graph, scores[None], SelectionSettings("greedy", 9))[0]
    data = circuit_to_json(graph, scores, circuit)
    assert data["cfg"] == {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
                           "parallel_attn_mlp": graph.parallel_attn_mlp, "d_model": 16}
    assert list(data["edges"]) == graph.edge_names
    for e, name in enumerate(graph.edge_names):
        assert data["edges"][name] == {"score": float(scores[e]), "in_graph": bool(circuit[e])}
    # a node is in the graph when a circuit edge leaves it or enters one of its inputs
    assert list(data["nodes"]) == graph.forward_names + ["logits"]
    touched = set()
    for name, edge in data["edges"].items():
        if edge["in_graph"]:
            parent, child = name.split("->")
            touched |= {parent, child.split("<")[0]}
    assert {n for n, v in data["nodes"].items() if v["in_graph"]} == touched
    assert data["nodes"]["logits"]["in_graph"]
    json.dumps(data)  # plain JSON types only


def test_empty_circuit_exports_no_node(graph):
    data = circuit_to_json(graph, torch.zeros(graph.n_edges),
                           torch.zeros(graph.n_edges, dtype=torch.bool))
    assert not any(v["in_graph"] for v in data["nodes"].values())
    assert not any(v["in_graph"] for v in data["edges"].values())


def test_reading_a_partial_file_defaults_missing_edges(graph, tmp_path):
    """EAP-IG files of the same graph may list only some edges (or a null score)."""
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"edges": {"m0->logits": {"score": None, "in_graph": True},
                                          "input->logits": {"score": 0.25}}}))
    scores, circuit = circuit_from_json(graph, path)
    assert edge_set(circuit) == {graph.edge_lookup["m0->logits"]}
    assert scores[graph.edge_lookup["input->logits"]] == 0.25
    assert scores.abs().sum() == 0.25


def edge_set(row):
    return set(row.nonzero()[:, 0].tolist())


def test_bad_files_raise_data_errors_naming_the_file(graph, tmp_path):
    unknown = tmp_path / "other_model.json"
    unknown.write_text(json.dumps({"edges": {"a7.h0->logits": {"score": 1.0, "in_graph": True}}}))
    with pytest.raises(DataError, match="a7.h0->logits") as err:
        circuit_from_json(graph, unknown)
    assert err.value.file == str(unknown) and err.value.field == "edges"
    assert str(unknown) in str(err.value)

    for name, text in [("broken.json", "{not json"), ("no_edges.json", '{"nodes": {}}'),
                       ("list.json", "[1, 2]")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match="not an EAP-IG circuit file") as err:
            circuit_from_json(graph, path)
        assert err.value.file == str(path)
    with pytest.raises(DataError):
        circuit_from_json(graph, tmp_path / "missing.json")
