"""Anchors: top/bottom k per method with a vote, a held-back pool, user ids, the bi-level
selection, and anchor circuits that survive a save and load."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings
from cud.data import load_qa
from cud.difficulty.anchors import (anchor_circuits, anchor_pool, anchors_from_ids,
                                    anchors_from_outcomes, check_compatible, load_anchors)
from cud.difficulty.bilevel import bilevel_anchors, select_subset, subset_objective
from cud.difficulty.groundtruth import difficulty, forgetting, read_outcomes
from cud.errors import ConfigError, DataError, StoreError
from cud.models import tiny_model

IDS = [f"s{i:02d}" for i in range(12)]


def table(nll_after, ids=IDS):
    return pd.DataFrame({"nll_after": nll_after, "prob_after": np.exp(-np.asarray(nll_after)),
                         "nll_delta": nll_after}, index=pd.Index(ids, name="id"))


def test_easy_is_most_forgotten_and_hard_least():
    t = table(np.arange(12.0))  # s11 has the highest loss after unlearning: most forgotten
    a = anchors_from_outcomes({"ga": t}, 2, pool_fraction=1.0)
    assert a.easy == ["s11", "s10"] and a.hard == ["s00", "s01"]
    # the same ranking read from the probability (lower = more forgotten)
    b = anchors_from_outcomes({"ga": t}, 2, outcome="prob_after", pool_fraction=1.0)
    assert (b.easy, b.hard) == (a.easy, a.hard)
    assert forgetting(t, "prob_after").idxmax() == "s11"
    assert difficulty(t, "nll_after").idxmax() == "s00"


def test_majority_vote_across_methods():
    base = np.arange(12.0)
    ga = table(base)
    npo = table(base[::-1].copy())             # disagrees completely
    swapped = base.copy()
    swapped[[11, 9]] = swapped[[9, 11]]        # agrees with ga on the top 2 as a set? no: 9, 10
    gd = table(swapped)
    a = anchors_from_outcomes({"ga": ga, "npo": npo, "graddiff": gd}, 2, pool_fraction=1.0)
    # top-2 easy: ga {s11, s10}, graddiff {s09, s10}, npo {s00, s01}: only s10 has 2 of 3 votes
    assert a.easy == ["s10"]
    assert a.details["threshold"] == 2
    anyone = anchors_from_outcomes({"ga": ga, "graddiff": gd}, 2, vote="any", pool_fraction=1.0)
    assert set(anyone.easy) == {"s11", "s10", "s09"}
    with pytest.raises(ConfigError, match="raise k or"):
        anchors_from_outcomes({"ga": ga, "npo": npo}, 1, vote="all", pool_fraction=1.0)


def test_the_pool_is_held_back_and_seeded():
    t = table(np.random.default_rng(0).random(12))
    a = anchors_from_outcomes({"ga": t}, 2, pool_fraction=0.5, seed=3)
    pool = anchor_pool(IDS, 0.5, 3)
    assert len(pool) == 6 and set(a.excluded) == set(pool)
    assert set(a.easy + a.hard) <= set(pool)
    assert anchor_pool(IDS, 0.5, 3) == pool and anchor_pool(IDS, 0.5, 4) != pool
    whole = anchors_from_outcomes({"ga": t}, 2, pool_fraction=1.0)
    assert set(whole.excluded) == set(whole.easy + whole.hard)


def test_impossible_requests_are_config_errors():
    t = table(np.arange(12.0))
    with pytest.raises(ConfigError, match="at least 14"):
        anchors_from_outcomes({"ga": t}, 7, pool_fraction=1.0)
    with pytest.raises(ConfigError, match="vote"):
        anchors_from_outcomes({"ga": t}, 2, vote="most", pool_fraction=1.0)
    with pytest.raises(DataError, match="unknown outcome"):
        anchors_from_outcomes({"ga": t}, 2, outcome="loss_later", pool_fraction=1.0)


def test_steps_to_forget_never_forgotten_is_hardest():
    t = pd.DataFrame({"steps_to_forget": [2.0, np.nan, 5.0, 1.0]},
                     index=pd.Index(["a", "b", "c", "d"], name="id"))
    d = difficulty(t, "steps_to_forget")
    assert list(d.sort_values().index) == ["d", "a", "c", "b"]


def test_user_ids_are_checked():
    a = anchors_from_ids(["s00"], ["s01", "s02"], known=IDS)
    assert a.excluded == ["s00", "s01", "s02"] and a.source == "ids"
    with pytest.raises(DataError, match="not among"):
        anchors_from_ids(["nope"], ["s01"], known=IDS)
    with pytest.raises(ConfigError, match="both easy and hard"):
        anchors_from_ids(["s01"], ["s01"])


def test_anchor_circuits_survive_save_and_load(tmp_path):
    graph = Graph(n_layers=2, n_heads=4)
    scores = torch.randn(12, graph.n_edges, generator=torch.Generator().manual_seed(0))
    a = anchors_from_ids(["s00", "s03"], ["s05"])
    ac = anchor_circuits(a, IDS, scores, graph, SelectionSettings(n_edges=10),
                         circuit_settings={"metric": "kl"})
    back = load_anchors(ac.save(tmp_path / "anchors"))
    assert back.anchors.to_dict() == a.to_dict()
    assert torch.equal(back.easy_circuit, ac.easy_circuit)
    assert torch.equal(back.hard_scores, ac.hard_scores)
    assert back.selection == ac.selection
    check_compatible(back, graph, {"metric": "kl"})
    with pytest.raises(ConfigError, match="another graph"):
        check_compatible(back, Graph(n_layers=3, n_heads=4), {})
    with pytest.raises(ConfigError, match="metric"):
        check_compatible(back, graph, {"metric": "logprob"})
    with pytest.raises(StoreError, match="not an anchors folder"):
        load_anchors(tmp_path)


def test_anchor_circuits_read_back_a_repeated_selection_exactly(monkeypatch):
    """A study selects the same anchors' circuits many times: a repeat is read back (no second
    selection), equal to selecting afresh; other anchors or another size select again; a
    caller changing its circuit does not change the remembered one."""
    import cud.difficulty.anchors as anchors_module
    from cud.circuits.selection import select
    graph = Graph(n_layers=2, n_heads=4)
    scores = torch.randn(12, graph.n_edges, generator=torch.Generator().manual_seed(1))
    calls = []

    def counting(g, s, settings):
        calls.append(settings.n_edges)
        return select(g, s, settings)
    monkeypatch.setattr(anchors_module, "select", counting)
    a, b = anchors_from_ids(["s00", "s03"], ["s05"]), anchors_from_ids(["s01"], ["s05", "s07"])
    ten, five = SelectionSettings(n_edges=10), SelectionSettings(n_edges=5)
    first = anchor_circuits(a, IDS, scores, graph, ten)
    first.easy_circuit[:] = ~first.easy_circuit      # a caller's change stays its own
    again = anchor_circuits(a, IDS, scores, graph, ten)
    other = anchor_circuits(b, IDS, scores, graph, ten)
    smaller = anchor_circuits(a, IDS, scores, graph, five)
    assert calls == [10, 10, 5]
    fresh = select(graph, torch.stack([again.easy_scores, again.hard_scores]), ten)
    assert torch.equal(again.easy_circuit, fresh[0]) and torch.equal(again.hard_circuit, fresh[1])
    assert int(again.easy_circuit.sum()) == 10 and int(smaller.easy_circuit.sum()) == 5
    assert not torch.equal(other.easy_circuit, again.easy_circuit)
    anchor_circuits(a, IDS, scores, Graph(n_layers=2, n_heads=4), ten)   # another graph object
    assert calls == [10, 10, 5, 10]


def test_read_outcomes_of_an_unlearn_folder(tmp_path):
    for m in ("ga", "npo"):
        (tmp_path / m).mkdir()
        table(np.arange(12.0)).to_parquet(tmp_path / m / "outcomes.parquet")
    tables = read_outcomes(tmp_path)
    assert list(tables) == ["ga", "npo"] and tables["ga"].index.name == "id"
    with pytest.raises(DataError, match="rmu"):
        read_outcomes(tmp_path, ["rmu"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("maximise", [True, False])
def test_bilevel_subset_matches_brute_force(seed, maximise):
    rng = np.random.default_rng(seed)
    n, k = 8, 3
    loss = rng.random(n)
    g = rng.normal(size=(n, 5))
    gram, retain = g @ g.T, rng.normal(size=n)
    choice = select_subset(loss, gram, k, maximise=maximise, retain=retain, eta=0.3, alpha=1.0)
    values = {c: subset_objective(c, loss, gram, retain, 0.3, 1.0)
              for c in itertools.combinations(range(n), k)}
    best = max(values.values()) if maximise else min(values.values())
    assert choice.objective == pytest.approx(best)
    assert choice.objective == pytest.approx(subset_objective(choice.indices, loss, gram, retain,
                                                              0.3, 1.0))
    # the local search (used for large candidate sets) ends swap-optimal and near the optimum
    local = select_subset(loss, gram, k, maximise=maximise, retain=retain, eta=0.3, alpha=1.0,
                          exhaustive_limit=0)
    sign = 1 if maximise else -1
    for a, b in itertools.product(local.indices, set(range(n)) - set(local.indices)):
        trial = [i for i in local.indices if i != a] + [b]
        assert sign * values[tuple(sorted(trial))] <= sign * local.objective + 1e-9


def test_bilevel_anchors_on_a_tiny_model():
    lm = tiny_model("llama", seed=0)
    samples = load_qa("builtin:16")
    a = bilevel_anchors(lm, samples[:10], 2, retain=samples[10:])
    assert len(a.easy) == 2 and len(a.hard) == 2 and not set(a.easy) & set(a.hard)
    assert set(a.easy + a.hard) <= {s.id for s in samples[:10]}
    assert a.source == "bilevel" and a.details["objective_easy"] >= a.details["objective_hard"]
