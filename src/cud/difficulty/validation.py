"""Held-out validation statistics: does a difficulty metric rank samples like unlearning does?

**No sample that informed the anchors enters a statistic.** Every statistic here is computed on
pairs produced by :func:`held_out_pairs`, the one gate, which drops the ``excluded`` ids (an
:class:`~cud.difficulty.anchors.AnchorSet`'s ``excluded``) and samples without a value. Every
public function takes ``excluded`` as a required keyword.

Statistics between a metric (read as "higher = harder", after :func:`orientation`) and the ground
truth difficulty (higher = less forgotten):

- Spearman ρ and Kendall τ-b (point values from :mod:`scipy.stats`);
- AUROC of the metric separating the hardest quartile (positives) from the easiest quartile
  (negatives) of the held-out samples, the middle half left out (point value from
  :func:`sklearn.metrics.roc_auc_score`);
- seeded percentile bootstrap intervals: samples are resampled with replacement (for AUROC,
  within the two quartiles, whose labels stay fixed).

Bootstrap replicates are computed in bulk (ranks, τ-b and the Mann-Whitney form of AUROC on
(B, n) arrays); tests check they equal scipy/scikit-learn on fixed inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

from cud.errors import ConfigError
from cud.statistics import spearman

STATISTICS = ("spearman", "kendall", "auroc")


# --- the gate -----------------------------------------------------------------------------------

def excluded_set(excluded: Iterable[str]) -> frozenset[str]:
    """Materialise ``excluded`` once (a generator must not be consumed by the first use)."""
    if isinstance(excluded, (str, bytes)):
        raise ConfigError("excluded must be a collection of sample ids, not one string")
    return frozenset(str(i) for i in excluded)


@dataclass(frozen=True)
class Pairs:
    """Aligned held-out values: ``metric[k]`` and ``truth[k]`` belong to sample ``ids[k]``."""

    ids: tuple[str, ...]
    metric: np.ndarray
    truth: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def held_out_pairs(metric: pd.Series, truth: pd.Series, *, excluded: Iterable[str]) -> Pairs:
    """The only way statistics get their data: ids in both series, with finite values, and not
    in ``excluded``; sorted by id so the result does not depend on either series' order."""
    banned = excluded_set(excluded)
    m = metric.copy()
    t = truth.copy()
    m.index, t.index = m.index.astype(str), t.index.astype(str)
    if m.index.has_duplicates or t.index.has_duplicates:
        raise ConfigError("a sample id appears twice in a metric or outcome")
    ids = sorted((set(m.index) & set(t.index)) - banned)
    mv = m.reindex(ids).to_numpy(dtype=float)
    tv = t.reindex(ids).to_numpy(dtype=float)
    ok = np.isfinite(mv) & np.isfinite(tv)
    kept = tuple(i for i, good in zip(ids, ok) if good)
    assert not banned & set(kept)  # the invariant this module exists for
    return Pairs(kept, mv[ok], tv[ok])


# --- point statistics (scipy / scikit-learn) ----------------------------------------------------

def kendall(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(τ-b, two-sided p)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    r = stats.kendalltau(x, y)
    return float(r.statistic), float(r.pvalue)


def extreme_quartiles(truth: np.ndarray, q: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels): the ⌊n·q⌋ hardest samples (label 1) and the ⌊n·q⌋ easiest (label 0);
    ties are broken by position (the caller's order is by id)."""
    n = len(truth)
    m = int(math.floor(n * q))
    if m < 1:
        return np.array([], dtype=int), np.array([], dtype=int)
    order = np.argsort(truth, kind="stable")
    idx = np.concatenate([order[-m:], order[:m]])
    labels = np.concatenate([np.ones(m, dtype=int), np.zeros(m, dtype=int)])
    return idx, labels


def auroc(metric: np.ndarray, truth: np.ndarray, q: float = 0.25) -> float:
    """AUROC of ``metric`` for hardest-quartile versus easiest-quartile samples."""
    from sklearn.metrics import roc_auc_score
    idx, labels = extreme_quartiles(truth, q)
    if len(idx) < 2:
        return math.nan
    return float(roc_auc_score(labels, metric[idx]))


# --- bulk bootstrap replicates ------------------------------------------------------------------

def _rank_rows(a: np.ndarray) -> np.ndarray:
    return stats.rankdata(a, axis=1)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row pair of (B, n) arrays (NaN where a row is constant)."""
    rx, ry = _rank_rows(x), _rank_rows(y)
    rx = rx - rx.mean(1, keepdims=True)
    ry = ry - ry.mean(1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / den, np.nan)


def kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall τ-b of each row pair of (B, n) arrays (O(B n²), in chunks of rows)."""
    n = x.shape[1]
    iu = np.triu_indices(n, 1)
    chunk = max(1, 4_000_000 // max(1, n * n))
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        xs, ys = x[start:start + chunk], y[start:start + chunk]
        dx = np.sign(xs[:, :, None] - xs[:, None, :])[:, iu[0], iu[1]]
        dy = np.sign(ys[:, :, None] - ys[:, None, :])[:, iu[0], iu[1]]
        s = (dx * dy).sum(1)
        den = np.sqrt((dx != 0).sum(1).astype(float) * (dy != 0).sum(1))  # pairs untied in x, y
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + chunk] = np.where(den > 0, s / den, np.nan)
    return out


def auroc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row of (B, m) scores against (B, m) 0/1 labels (Mann-Whitney form, ties
    count one half); NaN where a row has one class only."""
    ranks = _rank_rows(scores)
    pos = labels.sum(1)
    neg = labels.shape[1] - pos
    r_pos = (ranks * labels).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (r_pos - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def _interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) < 10:
        return math.nan, math.nan
    a = (1 - ci) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def evaluate_pairs(pairs: Pairs, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                   q: float = 0.25) -> dict[str, float]:
    """Point values, p-values and bootstrap intervals of the three statistics on ``pairs``."""
    if n_boot < 0:
        raise ConfigError(f"n_boot must be >= 0, got {n_boot}")
    if not 0 < ci < 1:
        raise ConfigError(f"ci must be in (0, 1), got {ci}")
    x, y = pairs.metric, pairs.truth
    rho, rho_p = spearman(x, y)
    tau, tau_p = kendall(x, y)
    auc = auroc(x, y, q)
    idx, labels = extreme_quartiles(y, q)
    out = {"n": len(pairs), "spearman": rho, "spearman_p": rho_p, "kendall": tau,
           "kendall_p": tau_p, "auroc": auc, "n_auroc": len(idx)}
    for s in STATISTICS:
        out[f"{s}_lo"] = out[f"{s}_hi"] = math.nan
    if n_boot and len(pairs) >= 3:
        rng = np.random.default_rng(seed)
        draw = rng.integers(0, len(pairs), size=(n_boot, len(pairs)))
        out["spearman_lo"], out["spearman_hi"] = _interval(spearman_rows(x[draw], y[draw]), ci)
        out["kendall_lo"], out["kendall_hi"] = _interval(kendall_rows(x[draw], y[draw]), ci)
        if len(idx) >= 2:
            sub = rng.integers(0, len(idx), size=(n_boot, len(idx)))
            out["auroc_lo"], out["auroc_hi"] = _interval(
                auroc_rows(x[idx][sub], labels[sub]), ci)
    return out


# --- repeated pools: replicates, pooled intervals, the permutation null, the paired test -----

def bootstrap_draws(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices of resamples with replacement, seeded; shared by every metric judged
    on the same samples, so that their differences are paired."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


@dataclass
class Replicates:
    """One metric against one truth on one held-out set: point values and the bootstrap
    replicates of Spearman ρ and AUROC drawn with given (shared) indices."""

    n: int
    spearman: float
    kendall: float
    auroc: float
    boot_spearman: np.ndarray
    boot_auroc: np.ndarray
    #: drawn with the indices every other metric of the same held-out set used
    shared: bool = False


def replicates(x: np.ndarray, y: np.ndarray, draws: np.ndarray, q: float = 0.25,
               quartile_draws: np.ndarray | None = None) -> Replicates:
    """Point statistics of ``x`` against ``y`` and their replicates on ``draws`` (B, n); AUROC's
    replicates resample within the extreme quartiles with ``quartile_draws`` ((B, 2m) indices
    into them; none without)."""
    rho = spearman(x, y)[0]
    tau = kendall(x, y)[0]
    auc = auroc(x, y, q)
    boot_rho = spearman_rows(x[draws], y[draws]) if len(draws) else np.array([])
    idx, labels = extreme_quartiles(y, q)
    if quartile_draws is not None and len(idx) >= 2 and len(quartile_draws):
        boot_auc = auroc_rows(x[idx][quartile_draws], labels[quartile_draws])
    else:
        boot_auc = np.array([])
    return Replicates(len(x), rho, tau, auc, boot_rho, boot_auc)


def pooled_interval(arrays: Iterable[np.ndarray], ci: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the replicates of several held-out sets taken together (their
    mixture): the spread of a statistic over both the anchor pools and the samples."""
    values = [a[np.isfinite(a)] for a in arrays]
    values = np.concatenate(values) if values else np.array([])
    if len(values) < 10:
        return math.nan, math.nan
    a = (1 - ci) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def permutation_null(y: np.ndarray, n_perm: int, seed: int) -> np.ndarray:
    """(n_perm,) Spearman ρ between a ranking without ties and ``y`` permuted at random: the
    distribution a random ranking's ρ has on these samples (a permutation null; it depends on
    ``y``'s ties only, not on any metric)."""
    rng = np.random.default_rng(seed)
    x = np.arange(len(y), dtype=float)
    perms = np.argsort(rng.random((n_perm, len(y))), axis=1)
    return spearman_rows(np.broadcast_to(x, perms.shape), y[perms])


def paired_difference(boot_a: np.ndarray, boot_b: np.ndarray, ci: float = 0.95
                      ) -> dict[str, float]:
    """Paired bootstrap test of statistic a against statistic b computed on the *same*
    resamples: the mean difference, its percentile interval, and the two-sided p-value
    2 min(P(d <= 0), P(d >= 0)) (capped at 1)."""
    d = np.asarray(boot_a, dtype=float) - np.asarray(boot_b, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 10:
        return {"diff": math.nan, "diff_lo": math.nan, "diff_hi": math.nan, "p": math.nan}
    a = (1 - ci) / 2
    p = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return {"diff": float(d.mean()), "diff_lo": float(np.quantile(d, a)),
            "diff_hi": float(np.quantile(d, 1 - a)), "p": p}


def stratified_spearman(x: np.ndarray, y: np.ndarray, groups: np.ndarray, min_size: int = 5
                        ) -> tuple[float, int]:
    """(the n-weighted mean of Spearman ρ within each group of at least ``min_size`` samples,
    the number of samples in those groups): an association that a group's mean level (a
    question template) cannot produce."""
    total, weight = 0.0, 0
    for g in pd.unique(groups):
        m = groups == g
        if m.sum() < min_size:
            continue
        rho = spearman(x[m], y[m])[0]
        if np.isfinite(rho):
            total += rho * m.sum()
            weight += int(m.sum())
    return (total / weight if weight else math.nan), weight


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman ρ of ``x`` and ``y`` with ``z`` held fixed: the Pearson correlation of the
    ranks' residuals after a linear fit on the ranks of ``z``."""
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    if ok.sum() < 4:
        return math.nan
    rx, ry, rz = (stats.rankdata(v[ok]) for v in (x, y, z))
    design = np.column_stack([np.ones(len(rz)), rz])

    def residual(v):
        coef, *_ = np.linalg.lstsq(design, v, rcond=None)
        return v - design @ coef

    ex, ey = residual(rx), residual(ry)
    den = np.sqrt((ex ** 2).sum() * (ey ** 2).sum())
    return float((ex * ey).sum() / den) if den > 0 else math.nan


# --- orientation --------------------------------------------------------------------------------

def orientation(metrics: pd.DataFrame, easy: Iterable[str], hard: Iterable[str]) -> pd.Series:
    """+1 or -1 per metric column: +1 when its mean over the hard anchors is at least its mean
    over the easy anchors (so "high = hard"), else -1. Read from the anchors only, which never
    enter a statistic, so orienting a baseline costs no held-out information."""
    easy, hard = [str(i) for i in easy], [str(i) for i in hard]
    frame = metrics.copy()
    frame.index = frame.index.astype(str)
    signs = {}
    for col in frame.columns:
        e = frame[col].reindex(easy).astype(float).mean()
        h = frame[col].reindex(hard).astype(float).mean()
        signs[col] = -1 if (np.isfinite(e) and np.isfinite(h) and h < e) else 1
    return pd.Series(signs, dtype=int, name="direction")


# --- tables -------------------------------------------------------------------------------------

COLUMNS = ["metric", "method", "outcome", "direction", "n", "spearman", "spearman_lo",
           "spearman_hi", "spearman_p", "kendall", "kendall_lo", "kendall_hi", "kendall_p",
           "auroc", "auroc_lo", "auroc_hi", "n_auroc"]


def validation_table(metrics: pd.DataFrame, truths: Mapping[tuple[str, str], pd.Series], *,
                     excluded: Iterable[str], directions: pd.Series | None = None,
                     n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (metric column, (method, outcome) truth): the held-out statistics.

    ``metrics``: index id, one column per difficulty metric. ``truths``: ``{(method, outcome):
    difficulty series}`` (higher = harder). ``directions``: ±1 per metric (default all +1); a
    metric is multiplied by its direction before any statistic. The bootstrap seed is the same
    for every row, so rows are compared on the same resamples.
    """
    banned = excluded_set(excluded)
    rows = []
    for col in metrics.columns:
        sign = int(directions.get(col, 1)) if directions is not None else 1
        for (method, outcome), truth in truths.items():
            pairs = held_out_pairs(sign * metrics[col].astype(float), truth, excluded=banned)
            stats_ = evaluate_pairs(pairs, n_boot=n_boot, ci=ci, seed=seed)
            rows.append({"metric": col, "method": method, "outcome": outcome,
                         "direction": sign, **stats_})
    return pd.DataFrame(rows, columns=COLUMNS)


def agreement_matrix(series: Mapping[str, pd.Series], *, excluded: Iterable[str]
                     ) -> pd.DataFrame:
    """Pairwise Spearman ρ between named per-sample series on their shared held-out samples
    (METHOD §9's reference line when the series are the methods' own outcomes)."""
    banned = excluded_set(excluded)
    names = list(series)
    out = pd.DataFrame(np.nan, index=names, columns=names)
    for a in names:
        for b in names:
            pairs = held_out_pairs(series[a], series[b], excluded=banned)
            out.loc[a, b] = spearman(pairs.metric, pairs.truth)[0]
    return out


def mean_off_diagonal(matrix: pd.DataFrame) -> float:
    values = matrix.to_numpy(dtype=float)
    mask = ~np.eye(len(values), dtype=bool)
    v = values[mask]
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan
