"""The held-out study on planted data: CUD finds a difficulty that lives in the circuits, every
table is computed on one held-out set that no anchor belongs to, and the predictor predicts only
samples it was not trained on."""

import numpy as np
import pandas as pd
import pytest
import torch

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings
from cud.difficulty.anchors import anchors_from_ids
from cud.difficulty.predictor import circuit_features, fit_predictor, layer_statistics
from cud.difficulty.study import StudySettings, run_study
from cud.errors import ConfigError

GRAPH = Graph(n_layers=2, n_heads=4)
SEL = SelectionSettings(n_edges=15)
N = 60


@pytest.fixture(scope="module")
def planted():
    """Edge scores mix an 'easy' and a 'hard' prototype; the mixing weight t is the difficulty,
    and every method's loss after unlearning falls with t (plus method-specific noise)."""
    g = torch.Generator().manual_seed(0)
    easy, hard = torch.randn(GRAPH.n_edges, generator=g), torch.randn(GRAPH.n_edges, generator=g)
    t = torch.rand(N, generator=g)
    scores = (1 - t)[:, None] * easy + t[:, None] * hard \
        + 0.3 * torch.randn(N, GRAPH.n_edges, generator=g)
    ids = [f"author{i // 5:03d}.f{i % 5}" for i in range(N)]
    rng = np.random.default_rng(0)
    outcomes = {}
    for m in ("ga", "npo", "graddiff"):
        after = 2.0 - 1.5 * t.numpy() + 0.2 * rng.normal(size=N)
        outcomes[m] = pd.DataFrame({"nll_after": after, "nll_delta": after - 0.2,
                                    "prob_after": np.exp(-after)}, index=pd.Index(ids, name="id"))
    baselines = pd.DataFrame({"loss": rng.normal(size=N), "prob": rng.random(N)},
                             index=pd.Index(ids, name="id"))
    return ids, scores, outcomes, baselines


SETTINGS = StudySettings(k=4, sizes=(10, 15), n_boot=200)


@pytest.fixture(scope="module")
def study(planted):
    ids, scores, outcomes, baselines = planted
    return run_study(ids, scores, GRAPH, SEL, outcomes, baselines=baselines, settings=SETTINGS)


def test_cud_recovers_a_planted_difficulty(study):
    h = study.heldout
    cud = h[(h["metric"] == "cud") & (h["outcome"] == "nll_after")]
    rand = h[(h["metric"] == "random") & (h["outcome"] == "nll_after")]
    assert (cud["spearman"] > 0.5).all() and (cud["spearman_lo"] > 0).all()
    assert (cud["auroc"] > 0.8).all()
    assert (cud["spearman"] > rand["spearman"].abs().to_numpy()).all()
    assert (cud["direction"] == 1).all()


def test_every_table_uses_the_held_out_set_only(study):
    anchor_ids = {i for a in study.anchors.values() for i in a.easy + a.hard}
    excluded = {i for a in study.anchors.values() for i in a.excluded}
    assert anchor_ids <= excluded and not set(study.held_out) & excluded
    assert len(study.held_out) + len(excluded) == N
    for table in (study.heldout, study.cross_method, study.robustness):
        assert (table["n"] <= len(study.held_out)).all() and len(table)
    held_flags = study.metrics["held_out"]
    assert set(held_flags[held_flags].index) == set(study.held_out)


def test_rigging_excluded_samples_changes_nothing(planted, study):
    ids, scores, outcomes, baselines = planted
    rigged = baselines.copy()
    for i in study.excluded:  # make every excluded sample's baselines perfect predictors
        rigged.loc[i] = [1e3 * outcomes["ga"].loc[i, "nll_after"]] * 2
    again = run_study(ids, scores, GRAPH, SEL, outcomes, baselines=rigged, settings=SETTINGS)
    pd.testing.assert_frame_equal(study.heldout.drop(columns="direction"),
                                  again.heldout.drop(columns="direction"))


def test_cross_method_and_agreement_tables(study):
    cm = study.cross_method
    assert set(cm["anchors_from"]) == {"ga", "npo", "graddiff"}
    assert len(cm) == 3 * 3 * 2
    agree = study.agreement["nll_after"]
    assert list(agree.columns) == ["ga", "npo", "graddiff"]
    assert np.allclose(np.diag(agree), 1.0)


def test_robustness_covers_sizes_distances_and_weighting(study):
    r = study.robustness
    combos = set(zip(r["n_edges"], r["distance"], r["weighted"]))
    assert combos == {(n, d, w) for n in (10, 15) for d in ("cosine", "jaccard", "hamming")
                      for w in (False, True)}
    main = r[(r["n_edges"] == 15) & (r["distance"] == "cosine") & ~r["weighted"]]
    assert main["rho_vs_main"].iloc[0] == pytest.approx(1.0)


def test_predictor_predicts_only_untrained_samples(planted, study):
    ids, scores, outcomes, _ = planted
    assert "predictor" in study.metrics
    predicted = study.metrics["predictor"].dropna().index
    assert not set(predicted) & set(study.predictor["train_ids"])
    assert set(study.held_out) <= set(predicted)
    p = study.heldout[(study.heldout["metric"] == "predictor")
                      & (study.heldout["outcome"] == "nll_after")]
    assert (p["spearman"] > 0.3).all()  # the planted signal is in the anchor distances


def test_user_anchors_are_used_and_held_back(planted):
    ids, scores, outcomes, _ = planted
    mine = anchors_from_ids(ids[:3], ids[3:6], name="mine")
    s = run_study(ids, scores, GRAPH, SEL, outcomes, anchors=mine,
                  settings=StudySettings(k=4, sizes=(15,), distances=("cosine",), n_boot=0,
                                         cross_method=False, predictor=False))
    assert s.anchors["main"] is mine and not set(ids[:6]) & set(s.held_out)
    assert s.cross_method.empty and len(s.held_out) == N - 6


def test_layer_statistics_fallback():
    c = torch.zeros(2, GRAPH.n_edges, dtype=torch.bool)
    logits_edges = np.flatnonzero(GRAPH.edge_child == GRAPH.logits_backward)
    c[0, logits_edges[0]] = True            # input -> logits: spans all layers
    c[1, logits_edges[-1]] = True           # m1 -> logits: one layer
    stats = layer_statistics(GRAPH, c.numpy())
    assert list(stats["edge_span_mean"]) == [3.0, 1.0]
    assert list(stats["last_third_edge_share"]) == [1.0, 1.0]


def test_predictor_needs_training_samples(planted):
    ids, scores, outcomes, _ = planted
    from cud.difficulty.anchors import anchor_circuits
    ac = anchor_circuits(anchors_from_ids(ids[:2], ids[2:4]), ids, scores, GRAPH, SEL)
    feats = circuit_features(ids, scores, ac)
    assert {"d_E_cosine", "d_H_jaccard_w"} <= set(feats.columns)
    with pytest.raises(ConfigError, match="at least 4"):
        fit_predictor(feats, -outcomes["ga"]["nll_after"], train=ids[:3])
