"""From scores to circuits and back to behaviour (METHOD §3): greedy / topn / threshold selection
checked against plain-Python reimplementations, and faithfulness per sample."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from cud.circuits.attribution import AttributionSettings, attribute
from cud.circuits.ablation import make_ablation
from cud.circuits.faithfulness import faithfulness
from cud.circuits.graph import Graph
from cud.circuits.runner import ResidualRunner
from cud.circuits.selection import SelectionSettings, greedy, greedy_stepwise, prune, select
from cud.data import collate, encode_samples
from cud.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

GRAPHS = {
    "2x4-sequential": Graph(2, 4, False, 8),
    "3x2-parallel": Graph(3, 2, True, 8),
    "1x1": Graph(1, 1, False, 8),
}


# Plain-Python references --------------------------------------------------------------------
def child_node(g: Graph, e: int) -> int:
    """The forward index of the node edge e feeds; ``g.n_forward`` stands for logits."""
    owner = int(g.backward_owner[g.edge_child[e]])
    return g.n_forward if owner < 0 else owner


def reference_greedy(g: Graph, scores: list[float], n: int) -> set[int]:
    nodes, chosen = {g.n_forward}, set()
    for _ in range(n):
        open_ = [e for e in range(g.n_edges) if e not in chosen and child_node(g, e) in nodes]
        if not open_:
            break
        best = max(open_, key=lambda e: abs(scores[e]))
        chosen.add(best)
        nodes.add(int(g.edge_parent[best]))
    return chosen


def nodes_reaching_logits(g: Graph, edges: set[int]) -> set[int]:
    """Forward nodes (and logits) with a path of ``edges`` to logits."""
    reach = {g.n_forward}
    changed = True
    while changed:
        changed = False
        for e in edges:
            p = int(g.edge_parent[e])
            if p not in reach and child_node(g, e) in reach:
                reach.add(p)
                changed = True
    return reach


def nodes_reached_from_input(g: Graph, edges: set[int]) -> set[int]:
    reach = {0}
    changed = True
    while changed:
        changed = False
        for e in edges:
            c = child_node(g, e)
            if c not in reach and int(g.edge_parent[e]) in reach:
                reach.add(c)
                changed = True
    return reach


def reference_prune(g: Graph, edges: set[int]) -> set[int]:
    """The edges that lie on a path input -> logits."""
    down, up = nodes_reaching_logits(g, edges), nodes_reached_from_input(g, edges)
    return {e for e in edges if int(g.edge_parent[e]) in up and child_node(g, e) in down}


def edge_set(row: torch.Tensor) -> set[int]:
    return set(row.nonzero()[:, 0].tolist())


def random_scores(seed: int, b: int, g: Graph) -> torch.Tensor:
    return torch.randn(b, g.n_edges, generator=torch.Generator().manual_seed(seed))


# Selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", list(GRAPHS))
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 130))
def test_greedy_grows_exactly_n_edges_from_logits(graph, seed, n):
    g = GRAPHS[graph]
    scores = random_scores(seed, 3, g)
    circuits = greedy(g, scores, n)
    assert circuits.shape == (3, g.n_edges) and circuits.dtype == torch.bool
    for i in range(3):
        chosen = edge_set(circuits[i])
        # every node reaches logits, so greedy can always grow until it runs out of edges
        assert len(chosen) == min(n, g.n_edges)
        assert chosen == reference_greedy(g, scores[i].tolist(), n)
        reach = nodes_reaching_logits(g, chosen)
        assert all(child_node(g, e) in reach for e in chosen), "an edge does not reach logits"
    assert torch.equal(select(g, scores, SelectionSettings("greedy", n)), circuits)


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("window", [1, 3, 64])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 400), ties=st.booleans())
def test_greedy_in_runs_equals_one_edge_at_a_time(graph, window, seed, n, ties):
    """Taking runs of edges per round is the same greedy as one edge per round, ties (broken
    by edge index) included, whatever the run length."""
    g = GRAPHS[graph]
    scores = random_scores(seed, 4, g)
    if ties:
        scores = torch.round(scores * 2) / 2
    assert torch.equal(greedy(g, scores, n, window=window), greedy_stepwise(g, scores, n))


def test_greedy_frontier_parents_need_not_reach_input():
    """Greedy (METHOD §3) is connected towards logits; the parents it adds last have no
    incoming edge yet. With one edge, the circuit is the single best edge into logits."""
    g = GRAPHS["2x4-sequential"]
    scores = torch.zeros(1, g.n_edges)
    best = g.edge_lookup["a1.h2->logits"]
    scores[0, best] = 5.0
    scores[0, g.edge_lookup["input->a0.h0<q>"]] = 9.0  # higher, but not next to logits
    assert edge_set(greedy(g, scores, 1)[0]) == {best}
    assert edge_set(prune(g, greedy(g, scores, 1))[0]) == set()


@pytest.mark.parametrize("graph", list(GRAPHS))
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 130))
def test_topn_is_the_pruned_top_n(graph, seed, n):
    g = GRAPHS[graph]
    scores = random_scores(seed, 2, g)
    circuits = select(g, scores, SelectionSettings("topn", n))
    for i in range(2):
        top = set(scores[i].abs().argsort(descending=True)[:n].tolist())
        chosen = edge_set(circuits[i])
        assert chosen == reference_prune(g, top)
        assert_on_input_logits_paths(g, chosen)


@pytest.mark.parametrize("graph", list(GRAPHS))
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), threshold=st.floats(0.0, 3.0))
def test_threshold_is_the_pruned_set_above_threshold(graph, seed, threshold):
    g = GRAPHS[graph]
    scores = random_scores(seed, 2, g)
    circuits = select(g, scores, SelectionSettings("threshold", threshold=threshold))
    for i in range(2):
        above = set((scores[i].abs() >= threshold).nonzero()[:, 0].tolist())
        chosen = edge_set(circuits[i])
        assert chosen == reference_prune(g, above)
        assert_on_input_logits_paths(g, chosen)


def assert_on_input_logits_paths(g: Graph, chosen: set[int]) -> None:
    """Every edge's parent is input or has an incoming circuit edge, and every edge's child
    reaches logits through circuit edges."""
    has_incoming = {child_node(g, e) for e in chosen}
    reach = nodes_reaching_logits(g, chosen)
    for e in chosen:
        p = int(g.edge_parent[e])
        assert p == 0 or p in has_incoming, f"{g.edge_names[e]}: parent has no incoming edge"
        assert child_node(g, e) in reach, f"{g.edge_names[e]}: child does not reach logits"


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_threshold_extremes_and_prune_idempotence(graph):
    g = GRAPHS[graph]
    scores = random_scores(0, 4, g)
    assert not select(g, scores, SelectionSettings("threshold", threshold=1e9)).any()
    assert select(g, scores, SelectionSettings("threshold", threshold=0.0)).all()
    assert select(g, scores, SelectionSettings("topn", g.n_edges + 5)).all()
    assert select(g, scores, SelectionSettings("greedy", g.n_edges + 5)).all()
    some = select(g, scores, SelectionSettings("topn", g.n_edges // 3))
    assert torch.equal(prune(g, some), some)
    assert not prune(g, torch.zeros(2, g.n_edges, dtype=torch.bool)).any()


def test_rows_are_selected_independently():
    g = GRAPHS["2x4-sequential"]
    scores = random_scores(7, 5, g)
    for how in (SelectionSettings("greedy", 17), SelectionSettings("topn", 17),
                SelectionSettings("threshold", threshold=1.0)):
        together = select(g, scores, how)
        for i in range(5):
            assert torch.equal(together[i], select(g, scores[i:i + 1], how)[0]), how


def test_selection_settings_are_validated():
    with pytest.raises(ConfigError, match="threshold"):
        SelectionSettings("threshold")
    with pytest.raises(ConfigError, match="unknown selection"):
        SelectionSettings("best")
    with pytest.raises(ConfigError, match="at least 1"):
        SelectionSettings("greedy", 0)


# Faithfulness -------------------------------------------------------------------------------
def encode(lm, samples):
    return collate(encode_samples(lm.tokenizer, samples), lm.pad_token_id)


def baseline_named(name, lm, runner, qa_samples):
    return make_ablation(name, tokenizer=lm.tokenizer, runner=runner,
                         reference=[encode(lm, qa_samples[4:])])


@pytest.mark.parametrize("baseline", ["zero", "mean", "corrupt"])
@pytest.mark.parametrize("metric", ["kl", "logprob"])
def test_faithfulness_is_one_for_the_full_graph_and_zero_for_the_empty_circuit(
        metric, baseline, family, make_lm, qa_samples):
    lm = make_lm(family)
    runner = ResidualRunner(lm.adapter)
    e = runner.graph.n_edges
    base = baseline_named(baseline, lm, runner, qa_samples)
    batch = encode(lm, qa_samples[:4])
    full = faithfulness(runner, batch, torch.ones(4, e, dtype=torch.bool), base, metric)
    empty = faithfulness(runner, batch, torch.zeros(4, e, dtype=torch.bool), base, metric)
    # one pass, a different circuit per sample
    mixed = faithfulness(runner, batch, torch.tensor([[True], [False], [False], [True]])
                         .expand(4, e), base, metric)
    assert full.faithfulness.shape == (4,)
    assert (full.metric_clean != full.metric_baseline).all()
    torch.testing.assert_close(full.faithfulness, torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(empty.faithfulness, torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed.faithfulness, torch.tensor([1.0, 0.0, 0.0, 1.0]),
                               atol=1e-4, rtol=0)
    if metric == "kl":
        assert (full.metric_clean.abs() < 1e-6).all()  # KL of the clean run to itself


@pytest.fixture(scope="module")
def kl_attribution(make_lm, qa_samples):
    """family -> (lm, runner, batch of 8, EAP-IG kl scores), default (unrandomised) models;
    zero baseline, so the reference code's by-layer schedule."""
    cache = {}

    def get(family):
        if family not in cache:
            lm = make_lm(family, randomised=False)
            runner = ResidualRunner(lm.adapter)
            batch = encode(lm, qa_samples[:8])
            att = attribute(runner, batch, make_ablation("zero"),
                            AttributionSettings("eap-ig-activations-by-layer", 5, "kl"))
            cache[family] = (lm, runner, batch, att.edge_scores)
        return cache[family]

    return get


def batch_faithfulness(runner, batch, circuits) -> float:
    """Faithfulness of the batch as a whole: the metric summed over samples, then normalised
    (per-sample ratios blow up where a sample's baseline barely moves the metric)."""
    out = faithfulness(runner, batch, circuits, make_ablation("zero"), "kl")
    recovered = (out.metric_circuit - out.metric_baseline).sum()
    return (recovered / (out.metric_clean - out.metric_baseline).sum()).item()


GRID = [2, 5, 10, 20, 40, 80, 1000]


def test_greedy_faithfulness_grows_with_n(family, kl_attribution):
    """Not monotone sample by sample (edges interact), but the trend over n is clear; and with
    kl, faithfulness = 1 - KL_circuit / KL_baseline is at most 1."""
    lm, runner, batch, scores = kl_attribution(family)
    g = runner.graph
    values = [batch_faithfulness(runner, batch, select(g, scores, SelectionSettings("greedy", n)))
              for n in GRID]
    rho = spearmanr(GRID, values).statistic
    assert rho >= 0.8, f"faithfulness over n={GRID}: {values} (Spearman {rho:.2f})"
    assert values[-1] == pytest.approx(1.0, abs=1e-4)
    assert max(values) <= 1 + 1e-4
    per_sample = faithfulness(runner, batch, select(g, scores, SelectionSettings("greedy", 40)),
                              make_ablation("zero"), "kl").faithfulness
    assert (per_sample <= 1 + 1e-4).all()


def test_greedy_circuits_from_scores_beat_random_circuits(family, kl_attribution):
    lm, runner, batch, scores = kl_attribution(family)
    g = runner.graph
    noise = torch.rand(scores.shape, generator=torch.Generator().manual_seed(0))
    for n in (20, 40, 80):
        ours = batch_faithfulness(runner, batch, select(g, scores, SelectionSettings("greedy", n)))
        chance = batch_faithfulness(runner, batch, select(g, noise, SelectionSettings("greedy", n)))
        assert ours > chance, f"n={n}: circuits from scores {ours:.2f}, random {chance:.2f}"


def test_faithfulness_of_a_batch_equals_one_sample_at_a_time(family, kl_attribution, qa_samples):
    lm, runner, batch, scores = kl_attribution(family)
    circuits = select(runner.graph, scores, SelectionSettings("greedy", 30))
    together = faithfulness(runner, batch, circuits, make_ablation("zero"), "logprob")
    for i, sample in enumerate(qa_samples[:len(batch)]):
        assert batch.ids[i] == sample.id
        alone = faithfulness(runner, encode(lm, [sample]), circuits[i:i + 1],
                             make_ablation("zero"), "logprob")
        for field in ("metric_clean", "metric_circuit", "metric_baseline"):
            torch.testing.assert_close(getattr(together, field)[i], getattr(alone, field)[0],
                                       atol=1e-5, rtol=1e-5)
