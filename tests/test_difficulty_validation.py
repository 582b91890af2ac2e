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


# --- repeated pools: the paired test, the permutation null, strata, partial ρ ------------------

def test_paired_difference_agrees_with_scipys_paired_bootstrap():
    """The same statistic (ρ(a, y) - ρ(b, y)) on paired resamples: our interval from shared
    draws equals scipy.stats.bootstrap(paired=True) within resampling noise."""
    from cud.difficulty.validation import bootstrap_draws, paired_difference, spearman_rows
    rng = np.random.default_rng(3)
    y = rng.normal(size=80)
    a = y + rng.normal(size=80)            # a strong metric
    b = y + 6 * rng.normal(size=80)        # a much weaker one
    draws = bootstrap_draws(80, 4000, seed=0)
    ours = paired_difference(spearman_rows(a[draws], y[draws]), spearman_rows(b[draws], y[draws]))

    def diff(a_, b_, y_):
        return stats.spearmanr(a_, y_).statistic - stats.spearmanr(b_, y_).statistic

    ref = stats.bootstrap((a, b, y), diff, paired=True, vectorized=False, n_resamples=4000,
                          method="percentile", random_state=np.random.default_rng(1))
    point = diff(a, b, y)
    assert ours["diff"] == pytest.approx(point, abs=0.03)
    assert ours["diff_lo"] == pytest.approx(ref.confidence_interval.low, abs=0.04)
    assert ours["diff_hi"] == pytest.approx(ref.confidence_interval.high, abs=0.04)
    assert ours["p"] < 0.05 and ours["diff_lo"] > 0  # a is better, and the test says so
    same = paired_difference(spearman_rows(a[draws], y[draws]),
                             spearman_rows(a[draws], y[draws]))
    assert same["diff"] == 0 and same["p"] == 1.0


def test_permutation_null_agrees_with_scipys_permutation_test():
    from cud.difficulty.validation import permutation_null
    rng = np.random.default_rng(4)
    y = np.round(rng.normal(size=60), 1)   # ties, as real outcomes have
    x = 0.3 * y + rng.normal(size=60)
    observed = stats.spearmanr(x, y).statistic
    null = permutation_null(y, 5000, seed=0)
    ours = float((np.abs(null) >= abs(observed)).mean())
    ref = stats.permutation_test((x, y), lambda a, b: stats.spearmanr(a, b).statistic,
                                 permutation_type="pairings", n_resamples=5000,
                                 random_state=np.random.default_rng(2)).pvalue
    assert ours == pytest.approx(ref, abs=0.02)
    assert abs(null.mean()) < 0.02 and 0.1 < np.quantile(null, 0.975) < 0.35


def test_pooled_interval_is_the_mixture_of_the_pools_replicates():
    from cud.difficulty.validation import pooled_interval
    a, b = np.linspace(0, 1, 101), np.linspace(2, 3, 101)
    lo, hi = pooled_interval([a, b], ci=0.5)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(np.concatenate([a, b]), [0.25, 0.75])))
    assert np.isnan(pooled_interval([np.array([1.0, np.nan])])[0])


def test_stratified_and_partial_spearman():
    from cud.difficulty.validation import partial_spearman, stratified_spearman
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(4), 25)
    level = groups.astype(float)
    # x and y share only their group's level: across groups they correlate, within none
    x, y = level + 0.1 * rng.normal(size=100), level + 0.1 * rng.normal(size=100)
    assert stats.spearmanr(x, y).statistic > 0.8
    within, n = stratified_spearman(x, y, groups)
    assert n == 100 and abs(within) < 0.3
    by_hand = np.average([stats.spearmanr(x[groups == g], y[groups == g]).statistic
                          for g in range(4)], weights=[25] * 4)
    assert within == pytest.approx(by_hand)
    # x and y both follow z: holding z fixed removes the association
    z = rng.normal(size=100)
    x2, y2 = z + 0.2 * rng.normal(size=100), z + 0.2 * rng.normal(size=100)
    assert stats.spearmanr(x2, y2).statistic > 0.8 and abs(partial_spearman(x2, y2, z)) < 0.3
    # an association beyond z survives
    w = rng.normal(size=100)
    assert partial_spearman(w + 0.3 * z, w + 0.3 * rng.normal(size=100), z) > 0.7
