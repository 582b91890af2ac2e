"""Group comparisons, effect sizes, correlations and the structure analysis."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from cud.analysis import (PAPER_EXPECTATIONS, analyze_structure, cliffs_delta, compare_groups,
                          correlations, cud_groups, holm, mann_whitney)

values = st.lists(st.integers(-5, 5), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(values, values)
def test_cliffs_delta_is_the_pairwise_dominance(low, high):
    pairs = list(itertools.product(low, high))
    expected = (sum(h > l for l, h in pairs) - sum(h < l for l, h in pairs)) / len(pairs)
    assert cliffs_delta(low, high) == pytest.approx(expected)
    assert cliffs_delta(high, low) == pytest.approx(-expected)


def test_cliffs_delta_is_the_rank_biserial_of_mann_whitney():
    rng = np.random.default_rng(1)
    low, high = rng.normal(0, 1, 20), rng.normal(0.7, 1, 17)
    test = mann_whitney(low, high)
    u = sps.mannwhitneyu(high, low).statistic
    assert test.u == pytest.approx(u)
    assert test.cliffs_delta == pytest.approx(2 * u / (20 * 17) - 1)
    assert test.cliffs_delta == pytest.approx(cliffs_delta(low, high))
    assert test.p_value == pytest.approx(sps.mannwhitneyu(high, low).pvalue)


def test_mann_whitney_edge_cases():
    separated = mann_whitney(np.arange(10), np.arange(10) + 100)
    assert separated.cliffs_delta == 1 and separated.p_value < 0.001
    same = mann_whitney([2.0] * 5, [2.0] * 6)
    assert same.cliffs_delta == 0 and same.p_value == 1
    few = mann_whitney([1.0, 2.0], [3.0, 4.0, 5.0])
    assert np.isnan(few.p_value) and few.n_low == 2
    with_nan = mann_whitney([1, 2, np.nan, 3], [4, 5, 6, np.inf])
    assert (with_nan.n_low, with_nan.n_high) == (3, 3)


def test_holm():
    p = holm([0.01, 0.04, np.nan, 0.03, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 with m = 4: 0.04, 0.09, max(0.09, 0.08), 0.5
    np.testing.assert_allclose(p, [0.04, 0.09, np.nan, 0.09, 0.5])
    assert np.isnan(holm([np.nan])).all()


def _planted(n=30, seed=0):
    """Statistics where hard circuits have longer edges (as the paper says), shallower nodes
    (against it), noise in the path length, and a statistic without a claim."""
    rng = np.random.default_rng(seed)
    ids = [f"s{i:03d}" for i in range(2 * n)]
    hard = np.r_[np.zeros(n), np.ones(n)]
    stats = pd.DataFrame({
        "edge_span_mean": rng.normal(2, 0.3, 2 * n) + 1.5 * hard,
        "node_layer_mean": rng.normal(10, 1, 2 * n) - 3 * hard,
        "path_longest": rng.normal(5, 1, 2 * n),
        "n_edges": rng.normal(75, 5, 2 * n) + 20 * hard,
    }, index=pd.Index(ids, name="id"))
    return stats, ids[:n], ids[n:]


def test_compare_groups_verdicts():
    stats, easy, hard = _planted()
    table = compare_groups(stats, easy, hard, expectations=PAPER_EXPECTATIONS)
    assert table.loc["edge_span_mean", "verdict"] == "agrees"
    assert table.loc["edge_span_mean", "cliffs_delta"] > 0.8
    assert table.loc["node_layer_mean", "verdict"] == "opposite"
    assert table.loc["node_layer_mean", "cliffs_delta"] < -0.8
    assert table.loc["path_longest", "verdict"] == "not significant"
    assert table.loc["n_edges", "verdict"] == "no claim"
    assert table.loc["edge_span_mean", "expected"] == "higher in hard"
    assert (table["p_holm"] >= table["p_value"]).all()
    assert (table[["n_easy", "n_hard"]] == 30).all().all()


def test_compare_groups_ignores_unknown_ids_and_needs_samples():
    stats, easy, hard = _planted(n=2)
    table = compare_groups(stats, easy + ["nope"], hard, expectations=PAPER_EXPECTATIONS)
    assert (table["n_easy"] == 2).all()
    assert (table["verdict"] == "too few samples").all()


def test_cud_groups():
    cud = pd.Series([0.1, 0.9, 0.5, 0.2, 0.8, 0.5, np.nan, 0.3, 0.7],
                    index=list("abcdefghi"))
    groups = cud_groups(cud, fraction=1 / 3)
    assert groups == {"easy": ["a", "d"], "hard": ["e", "b"]}
    groups = cud_groups(cud, fraction=1 / 3, exclude=["a"])
    assert groups["easy"] == ["d", "h"] and "a" not in groups["hard"]
    with pytest.raises(ValueError):
        cud_groups(cud, fraction=0.7)


def test_correlations():
    stats, easy, hard = _planted()
    difficulty = pd.Series(np.r_[np.zeros(30), np.ones(30)], index=stats.index)
    targets = pd.DataFrame({"monotone": stats["edge_span_mean"].rank(),
                            "step": difficulty, "flat": 1.0})
    table = correlations(stats, targets, expectations=PAPER_EXPECTATIONS)
    assert list(table.columns) == ["target", "statistic", "n", "rho", "p_value", "p_holm",
                                   "expected", "verdict"]
    row = table.set_index(["target", "statistic"])
    assert row.loc[("monotone", "edge_span_mean"), "rho"] == pytest.approx(1.0)
    assert row.loc[("monotone", "edge_span_mean"), "verdict"] == "agrees"
    assert row.loc[("step", "node_layer_mean"), "verdict"] == "opposite"
    assert (row.loc["flat", "verdict"] == "constant").all()
    assert (row.loc["step", "n"] == 60).all()


def test_correlations_use_shared_finite_samples():
    stats, _, _ = _planted(n=5)
    stats.iloc[0, 0] = np.nan
    target = pd.DataFrame({"t": np.arange(8.0)}, index=stats.index[:8])
    table = correlations(stats, target).set_index("statistic")
    assert table.loc["edge_span_mean", "n"] == 7
    assert table.loc["node_layer_mean", "n"] == 8


def test_analyze_structure(tmp_path):
    stats, easy, hard = _planted()
    cud = pd.Series(np.r_[np.linspace(0, 0.4, 30), np.linspace(0.6, 1, 30)], index=stats.index)
    outcome = {"graddiff nll_after": -stats["edge_span_mean"]}   # a difficulty, higher = harder
    anchors = {"easy": easy[:8], "hard": hard[-8:]}
    result = analyze_structure(stats, anchors=anchors, cud=cud, difficulties=outcome)
    assert result.anchors.loc["edge_span_mean", "verdict"] == "agrees"
    # anchors are left out of the CUD thirds
    cud_ids = set(result.groups["cud"]["easy"]) | set(result.groups["cud"]["hard"])
    assert not cud_ids & set(anchors["easy"] + anchors["hard"])
    assert len(result.groups["cud"]["easy"]) == (60 - 16) // 3
    rho = result.correlations.set_index(["target", "statistic"])
    assert rho.loc[("graddiff nll_after", "edge_span_mean"), "verdict"] == "opposite"
    summary = result.summary()
    assert summary["anchors"]["agrees"] == 1 and summary["anchors"]["opposite"] == 1
    assert summary["rho: graddiff nll_after"]["opposite"] >= 1
    assert result.notes == []

    written = result.save(tmp_path / "a")
    names = {p.name for p in written}
    assert {"structure.parquet", "compare_anchors.csv", "compare_cud.csv", "correlations.csv",
            "summary.json"} <= names
    back = pd.read_parquet(tmp_path / "a" / "structure.parquet")
    pd.testing.assert_frame_equal(back, result.statistics)
    meta = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert meta["summary"]["anchors"]["agrees"] == 1


def test_analyze_structure_without_inputs_says_so():
    stats, _, _ = _planted(n=5)
    result = analyze_structure(stats)
    assert result.anchors is None and result.cud is None and result.correlations is None
    assert len(result.notes) == 3 and result.summary() == {}
