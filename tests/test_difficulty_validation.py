"""Validation statistics: they agree with scipy / scikit-learn, the bootstrap is seeded, and no
excluded (anchor) sample can reach a statistic, however the exclusion is handed over."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from cud.difficulty.validation import (agreement_matrix, auroc, auroc_rows, evaluate_pairs,
                                       extreme_quartiles, held_out_pairs, kendall_rows,
                                       orientation, spearman_rows, validation_table)
from cud.errors import ConfigError

IDS = [f"s{i:02d}" for i in range(40)]


def series(values, ids=IDS, name=None):
    return pd.Series(values, index=pd.Index(ids, name="id"), name=name, dtype=float)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=40)
    metric = truth + rng.normal(size=40)
    metric[:5] = np.round(metric[:5])  # some ties
    return series(metric), series(np.round(truth, 1))


def test_row_statistics_equal_scipy_and_sklearn_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=(30, 17)).astype(float)
    y = rng.integers(0, 4, size=(30, 17)).astype(float)
    rho, tau = spearman_rows(x, y), kendall_rows(x, y)
    labels = (rng.random((30, 17)) < 0.5).astype(int)
    auc = auroc_rows(x, labels)
    for b in range(30):
        assert rho[b] == pytest.approx(stats.spearmanr(x[b], y[b]).statistic)
        assert tau[b] == pytest.approx(stats.kendalltau(x[b], y[b]).statistic)
        if 0 < labels[b].sum() < 17:
            assert auc[b] == pytest.approx(roc_auc_score(labels[b], x[b]))


def test_point_statistics_equal_scipy_and_sklearn(data):
    metric, truth = data
    pairs = held_out_pairs(metric, truth, excluded=[])
    out = evaluate_pairs(pairs, n_boot=0)
    assert out["n"] == 40
    assert out["spearman"] == pytest.approx(stats.spearmanr(pairs.metric, pairs.truth).statistic)
    assert out["kendall"] == pytest.approx(stats.kendalltau(pairs.metric, pairs.truth).statistic)
    idx, labels = extreme_quartiles(pairs.truth)
    assert len(idx) == 20 and labels.sum() == 10
    hard = np.sort(pairs.truth)[-10:]
    assert set(pairs.truth[idx[labels == 1]]) <= set(hard)
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, pairs.metric[idx]))
    assert auroc(pairs.metric, pairs.truth) == out["auroc"]


def test_bootstrap_is_seeded_and_brackets_the_estimate(data):
    metric, truth = data
    pairs = held_out_pairs(metric, truth, excluded=[])
    a = evaluate_pairs(pairs, n_boot=300, seed=5)
    b = evaluate_pairs(pairs, n_boot=300, seed=5)
    c = evaluate_pairs(pairs, n_boot=300, seed=6)
    assert a == b and a["spearman_lo"] != c["spearman_lo"]
    for s in ("spearman", "kendall", "auroc"):
        assert a[f"{s}_lo"] <= a[s] <= a[f"{s}_hi"]
    with pytest.raises(ConfigError):
        evaluate_pairs(pairs, ci=1.5)


# --- leaks --------------------------------------------------------------------------------------

ANCHORS = ["s00", "s01", "s02", "s03", "s04", "s05"]


def test_excluded_samples_never_reach_a_statistic(data):
    metric, truth = data
    clean = validation_table(pd.DataFrame({"m": metric}), {("ga", "nll"): truth},
                             excluded=ANCHORS, n_boot=200)
    # make the anchors as informative as possible: if any of them leaked, the numbers would move
    rigged_metric, rigged_truth = metric.copy(), truth.copy()
    rigged_metric[ANCHORS] = [1e6, -1e6, 1e6, -1e6, 1e6, np.inf]
    rigged_truth[ANCHORS] = [1e6, -1e6, 1e6, -1e6, 1e6, 0]
    rigged = validation_table(pd.DataFrame({"m": rigged_metric}), {("ga", "nll"): rigged_truth},
                              excluded=ANCHORS, n_boot=200)
    pd.testing.assert_frame_equal(clean, rigged)
    assert clean["n"].iloc[0] == 40 - len(ANCHORS)


def test_a_generator_of_excluded_ids_excludes_from_every_row(data):
    metric, truth = data
    frame = pd.DataFrame({"a": metric, "b": -metric, "c": metric * 2})
    truths = {("ga", "x"): truth, ("npo", "x"): truth}
    table = validation_table(frame, truths, excluded=(i for i in ANCHORS), n_boot=0)
    assert (table["n"] == 40 - len(ANCHORS)).all() and len(table) == 6


def test_excluded_ids_match_whatever_the_index_type():
    metric = pd.Series(np.arange(10.0), index=range(10))           # integer ids
    truth = pd.Series(np.arange(10.0), index=[str(i) for i in range(10)])
    pairs = held_out_pairs(metric, truth, excluded=["0", 1])
    assert "0" not in pairs.ids and "1" not in pairs.ids and len(pairs) == 8


def test_one_string_is_not_a_list_of_ids(data):
    metric, truth = data
    with pytest.raises(ConfigError, match="not one string"):
        held_out_pairs(metric, truth, excluded="s00")


def test_duplicate_ids_are_refused():
    dup = pd.Series([1.0, 2.0, 3.0], index=["a", "a", "b"])
    with pytest.raises(ConfigError, match="twice"):
        held_out_pairs(dup, pd.Series([1.0, 2.0], index=["a", "b"]), excluded=[])


def test_agreement_matrix_uses_held_out_samples_only(data):
    metric, truth = data
    rigged = metric.copy()
    rigged[ANCHORS] = truth[ANCHORS] * 1e6
    m1 = agreement_matrix({"a": metric, "b": truth}, excluded=ANCHORS)
    m2 = agreement_matrix({"a": rigged, "b": truth}, excluded=ANCHORS)
    pd.testing.assert_frame_equal(m1, m2)
    assert m1.loc["a", "a"] == pytest.approx(1.0)


def test_orientation_is_read_from_the_anchors():
    frame = pd.DataFrame({"up": [0.0, 0.1, 0.9, 1.0], "down": [1.0, 0.9, 0.1, 0.0]},
                         index=["e1", "e2", "h1", "h2"])
    d = orientation(frame, ["e1", "e2"], ["h1", "h2"])
    assert d["up"] == 1 and d["down"] == -1
    table = validation_table(pd.DataFrame({"down": series(-np.arange(40.0))}),
                             {("ga", "x"): series(np.arange(40.0))}, excluded=[],
                             directions=d, n_boot=0)
    assert table["spearman"].iloc[0] == pytest.approx(1.0)
