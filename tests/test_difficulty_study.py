"""The held-out study on planted data: CUD finds a difficulty that lives in the circuits, every
table of a pool is computed on held-out samples that no anchor belongs to, the predictors
predict only samples they were not trained on, the variant is chosen without reading a held-out
id, ``random`` is a permutation null, and the confound check sees a question template."""

from dataclasses import replace

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


SETTINGS = StudySettings(k=4, sizes=(10, 15), n_boot=200, n_perm=200, pools=3,
                         variant_sizes=(15, 30), node_k=6)


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
    assert (cud["spearman"] > rand["spearman_hi"].to_numpy()).all()
    assert (cud["direction"] == 1).all() and (cud["pools"] == 3).all()
    assert (cud["spearman_p"] < 0.05).all()


def test_pools_are_different_splits_and_every_pool_is_reported(study):
    pools = study.pools
    assert len(pools) == 3 and len({tuple(p["pool"]) for p in pools}) == 3
    for p in pools:
        assert not set(p["pool"]) & set(p["held_out"]) and len(p["held_out"]) == N // 2
    pp = study.per_pool
    assert set(pp["pool"]) == {0, 1, 2}
    mean = pp[(pp["metric"] == "cud") & (pp["method"] == "ga") & (pp["outcome"] == "nll_after")]
    row = study.heldout[(study.heldout["metric"] == "cud") & (study.heldout["method"] == "ga")
                        & (study.heldout["outcome"] == "nll_after")].iloc[0]
    assert row["spearman"] == pytest.approx(mean["spearman"].mean())
    assert row["spearman_sd"] == pytest.approx(mean["spearman"].std(ddof=1))


def test_random_is_a_permutation_null(study):
    r = study.heldout[study.heldout["metric"] == "random"]
    assert len(r) == 6 and (r["spearman"].abs() < 0.05).all()  # 3 methods x 2 outcomes
    half_width = 1.96 / np.sqrt(N // 2 - 1)  # a null rho's 95% range, roughly
    assert (r["spearman_hi"].between(0.6 * half_width, 1.4 * half_width)).all()


def test_paired_test_against_the_best_baseline(study):
    p = study.paired
    cud = p[(p["metric"] == "cud") & (p["outcome"] == "nll_after")]
    assert len(cud) == 3 and set(cud["versus"]) <= {"loss", "prob"}
    # the planted baselines are noise: CUD beats the best of them, and the test says so
    assert (cud["diff_lo"] > 0).all() and (cud["p"] < 0.05).all()
    assert (cud["pools_won"] == 1.0).all()


def test_every_table_uses_the_held_out_set_only(study):
    anchor_ids = {i for a in study.anchors.values() for i in a.easy + a.hard}
    excluded = {i for a in study.anchors.values() for i in a.excluded}
    assert anchor_ids <= excluded and not set(study.held_out) & excluded
    assert len(study.held_out) + len(excluded) == N
    for table in (study.heldout, study.cross_method, study.robustness, study.per_pool):
        assert (table["n"] <= len(study.held_out)).all() and len(table)
    held_flags = study.metrics["held_out"]
    assert set(held_flags[held_flags].index) == set(study.held_out)


def test_rigging_excluded_samples_changes_nothing(planted):
    ids, scores, outcomes, baselines = planted
    one = replace(SETTINGS, pools=1)
    study = run_study(ids, scores, GRAPH, SEL, outcomes, baselines=baselines, settings=one)
    rigged = baselines.copy()
    for i in study.excluded:  # make every excluded sample's baselines perfect predictors
        rigged.loc[i] = [1e3 * outcomes["ga"].loc[i, "nll_after"]] * 2
    again = run_study(ids, scores, GRAPH, SEL, outcomes, baselines=rigged, settings=one)
    # the combined predictor is trained on the pool, where rigging is allowed to change it
    keep = ~study.heldout["metric"].isin(["combined"])
    pd.testing.assert_frame_equal(study.heldout[keep].drop(columns="direction"),
                                  again.heldout[keep].drop(columns="direction"))


def test_the_variant_is_chosen_without_reading_a_held_out_id(planted, study):
    """Rewrite every held-out sample's outcome: the validation scores and the chosen variant
    of every pool stay exactly as they were."""
    ids, scores, outcomes, baselines = planted
    for k, pool in enumerate(study.pools):
        held = pool["held_out"]
        rigged = {m: t.copy() for m, t in outcomes.items()}
        for t in rigged.values():
            t.loc[held, ["nll_after", "nll_delta"]] = -t.loc[held, ["nll_after", "nll_delta"]]
        again = run_study(ids, scores, GRAPH, SEL, rigged, baselines=baselines,
                          settings=replace(SETTINGS, seed=pool["seed"], pools=1))
        before = study.variants[study.variants["pool"] == pool["seed"]].reset_index(drop=True)
        pd.testing.assert_frame_equal(before, again.variants)
        assert again.pools[0]["selected"] == pool["selected"]


def test_variants_are_scored_and_one_is_selected(study):
    h = study.heldout
    names = set(h["metric"])
    assert {"cud", "cud_weighted", "cud_n30", "cud_nodes", "cud_set_mean", "cud_set_knn",
            "selected", "predictor", "combined"} <= names
    v = study.variants
    assert (v.groupby("pool")["selected"].sum() == 1).all()
    chosen = v[v["selected"]].set_index("pool")["validation_spearman"]
    best = v.groupby("pool")["validation_spearman"].max()
    assert (chosen == best).all()


def test_cross_method_and_agreement_tables(study):
    cm = study.cross_method
    assert set(cm["anchors_from"]) == {"ga", "npo", "graddiff"}
    assert len(cm) == 3 * 3 * 2 and (cm["pools"] == 3).all()
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
    assert "predictor" in study.metrics and "combined" in study.metrics
    for name in ("predictor", "combined"):
        predicted = study.metrics[name].dropna().index
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
                                         n_perm=0, cross_method=False, predictor=False,
                                         variants=False))
    assert s.anchors["main"] is mine and not set(ids[:6]) & set(s.held_out)
    assert s.cross_method.empty and len(s.held_out) == N - 6 and len(s.pools) == 1


def test_confounds_see_a_question_template(planted):
    """Difficulty planted as a per-type level: the question-type baseline predicts it, the
    confound table finds it in the difficulty (Kruskal-Wallis), and within types nothing is
    left for CUD (the circuits know nothing of the types)."""
    ids, scores, _, baselines = planted
    types = np.array([i % 3 for i in range(N)])
    rng = np.random.default_rng(1)
    outcomes = {m: pd.DataFrame({"nll_after": 2.0 * types + 0.1 * rng.normal(size=N),
                                 "nll_delta": 2.0 * types + 0.1 * rng.normal(size=N)},
                                index=pd.Index(ids, name="id")) for m in ("ga", "npo")}
    info = pd.DataFrame({"question_type": [f"t{t}" for t in types],
                         "n_answer_tokens": rng.integers(3, 30, size=N)},
                        index=pd.Index(ids, name="id"))
    s = run_study(ids, scores, GRAPH, SEL, outcomes, baselines=baselines, info=info,
                  settings=replace(SETTINGS, cross_method=False, vote="any"))
    h = s.heldout[s.heldout["outcome"] == "nll_after"].set_index(["metric", "method"])
    assert (h.loc["question_type", "spearman"] > 0.8).all()
    c = s.confounds
    of_truth = c[(c["quantity"].str.startswith("question type")) & c["of"].str.startswith("diff")]
    assert (of_truth["p"] < 1e-4).all()
    within = c[(c["quantity"] == "held-out rho within question types") & (c["of"] == "cud")]
    assert len(within) and (within["value"].abs() < 0.5).all()
    assert {"answer length (Spearman rho)", "held-out rho, answer length held fixed"} <= \
        set(c["quantity"])


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
