"""Group comparisons and correlations of per-circuit statistics (the tables of ``cud analyze``).

Conventions:
- a statistics table has one row per sample (index: sample id) and one numeric column per
  statistic (e.g. :func:`cud.circuits.structure.structure_statistics`);
- groups are compared as *low* (easy) against *high* (hard); every effect size reads
  "positive = higher in the hard group";
- every target of a correlation is a *difficulty*: higher = harder (CUD itself; for an unlearning
  outcome, minus its forgetting score, see :mod:`cud.difficulty.groundtruth`). So a statistic that
  the paper expects to be higher in hard circuits should correlate positively with every target;
- an *expectation* is +1 (higher in hard), -1 (lower in hard) or 0 (no claim);
- p-values are Holm-adjusted over the statistics of one comparison (or of one target), and a
  verdict uses the adjusted value: ``agrees`` (significant, in the expected direction),
  ``opposite`` (significant, against it), ``not significant``, ``no claim`` (no expectation),
  ``constant`` (no variation, nothing to test) or ``too few samples`` (fewer than
  :data:`MIN_SAMPLES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from cud.statistics import spearman

#: fewest samples per group (or per correlation) a test is run on
MIN_SAMPLES = 3
VERDICTS = ("agrees", "opposite", "not significant", "no claim", "constant", "too few samples")


@dataclass(frozen=True)
class GroupTest:
    """A two-sided Mann-Whitney U test of ``high`` against ``low``.

    ``u``: the U statistic of ``high`` (pairs with high > low, ties counted half);
    ``cliffs_delta`` = P(high > low) - P(high < low) = 2·u / (n_low·n_high) - 1, in [-1, 1], which
    is also the rank-biserial correlation of the test."""

    n_low: int
    n_high: int
    u: float
    p_value: float
    cliffs_delta: float


def _clean(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def cliffs_delta(low, high) -> float:
    """P(high > low) - P(high < low) over every (low, high) pair; NaN when a group is empty.
    Non-finite values are left out."""
    low, high = _clean(low), _clean(high)
    if not len(low) or not len(high):
        return float("nan")
    # sorted low: for each high value, how many lows are below / above it
    low = np.sort(low)
    below = np.searchsorted(low, high, side="left")
    above = len(low) - np.searchsorted(low, high, side="right")
    return float((below.sum() - above.sum()) / (len(low) * len(high)))


def mann_whitney(low, high) -> GroupTest:
    """Two-sided Mann-Whitney U test of ``high`` against ``low`` (non-finite values left out;
    p = NaN with fewer than :data:`MIN_SAMPLES` values in a group, p = 1 when all are equal)."""
    low, high = _clean(low), _clean(high)
    n_low, n_high = len(low), len(high)
    if n_low < MIN_SAMPLES or n_high < MIN_SAMPLES:
        return GroupTest(n_low, n_high, float("nan"), float("nan"), cliffs_delta(low, high))
    if np.ptp(np.concatenate([low, high])) == 0:
        return GroupTest(n_low, n_high, n_low * n_high / 2, 1.0, 0.0)
    result = sps.mannwhitneyu(high, low, alternative="two-sided")
    u = float(result.statistic)
    return GroupTest(n_low, n_high, u, float(result.pvalue), 2 * u / (n_low * n_high) - 1)


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values; NaN stays NaN and does not count as a test."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    tested = np.nonzero(np.isfinite(p))[0]
    m = len(tested)
    if not m:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


def verdict(effect: float, p_adjusted: float, expectation: int, alpha: float = 0.05) -> str:
    """One of :data:`VERDICTS` for an effect (sign = direction: positive = higher in hard);
    a NaN effect or p-value means the test could not be run (too few samples)."""
    if not np.isfinite(p_adjusted) or not np.isfinite(effect):
        return "too few samples"
    if expectation == 0:
        return "no claim"
    if p_adjusted >= alpha:
        return "not significant"
    return "agrees" if np.sign(effect) == np.sign(expectation) else "opposite"


def _numeric(stats: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        missing = [c for c in columns if c not in stats.columns]
        if missing:
            raise KeyError(f"no statistic(s) {', '.join(missing)} in the table")
        return list(columns)
    return [c for c in stats.columns if pd.api.types.is_numeric_dtype(stats[c])]


def _direction(expectation: int) -> str:
    return {1: "higher in hard", -1: "lower in hard"}.get(int(np.sign(expectation)), "")


def compare_groups(stats: pd.DataFrame, low_ids: Sequence[str], high_ids: Sequence[str], *,
                   expectations: Mapping[str, int] | None = None, alpha: float = 0.05,
                   columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Compare the rows ``low_ids`` (easy) with ``high_ids`` (hard), statistic by statistic.

    Returns one row per statistic (index ``statistic``) with columns ``n_easy``, ``n_hard``,
    ``median_easy``, ``median_hard``, ``mean_easy``, ``mean_hard``, ``u``, ``p_value``,
    ``p_holm``, ``cliffs_delta`` (positive = higher in hard), ``expected`` ("higher in hard",
    "lower in hard" or "") and ``verdict``. Ids missing from ``stats`` are left out."""
    expectations = dict(expectations or {})
    low = stats.loc[[i for i in low_ids if i in stats.index]]
    high = stats.loc[[i for i in high_ids if i in stats.index]]
    rows = []
    for col in _numeric(stats, columns):
        a, b = low[col].to_numpy(dtype=float), high[col].to_numpy(dtype=float)
        test = mann_whitney(a, b)
        rows.append({"statistic": col, "n_easy": test.n_low, "n_hard": test.n_high,
                     "median_easy": np.nanmedian(a) if np.isfinite(a).any() else np.nan,
                     "median_hard": np.nanmedian(b) if np.isfinite(b).any() else np.nan,
                     "mean_easy": np.nanmean(a) if np.isfinite(a).any() else np.nan,
                     "mean_hard": np.nanmean(b) if np.isfinite(b).any() else np.nan,
                     "u": test.u, "p_value": test.p_value, "cliffs_delta": test.cliffs_delta,
                     "expected": _direction(expectations.get(col, 0))})
    table = pd.DataFrame(rows).set_index("statistic")
    if table.empty:
        return table
    table["p_holm"] = holm(table["p_value"])
    table["verdict"] = [verdict(d, p, expectations.get(s, 0), alpha)
                        for s, d, p in zip(table.index, table["cliffs_delta"], table["p_holm"])]
    order = ["n_easy", "n_hard", "median_easy", "median_hard", "mean_easy", "mean_hard", "u",
             "p_value", "p_holm", "cliffs_delta", "expected", "verdict"]
    return table[order]


def cud_groups(cud: pd.Series, fraction: float = 1 / 3, exclude: Sequence[str] = ()
               ) -> dict[str, list[str]]:
    """The CUD-easy (lowest ``fraction``) and CUD-hard (highest ``fraction``) samples of a CUD
    series (index: id), ``exclude`` left out; ties broken by id so the split is deterministic."""
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    skip = set(exclude)
    values = cud.dropna()
    values = values[[i not in skip for i in values.index]]
    frame = pd.DataFrame({"cud": values.to_numpy(dtype=float),
                          "id": values.index.astype(str)}).sort_values(["cud", "id"])
    k = int(np.floor(len(frame) * fraction))
    ids = frame["id"].tolist()
    return {"easy": ids[:k], "hard": ids[len(ids) - k:] if k else []}


def correlations(stats: pd.DataFrame, targets: pd.DataFrame, *,
                 expectations: Mapping[str, int] | None = None, alpha: float = 0.05,
                 columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Spearman correlation of every statistic with every target (a *difficulty*: higher =
    harder), on the ids both tables share, each pair on the samples where both are finite.

    Long table, one row per (target, statistic): ``target``, ``statistic``, ``n``, ``rho``,
    ``p_value``, ``p_holm`` (Holm over the statistics of one target), ``expected``, ``verdict``."""
    expectations = dict(expectations or {})
    shared = [i for i in stats.index if i in set(targets.index)]
    rows = []
    for target in targets.columns:
        y_all = targets.loc[shared, target].to_numpy(dtype=float)
        block = []
        for col in _numeric(stats, columns):
            x_all = stats.loc[shared, col].to_numpy(dtype=float)
            ok = np.isfinite(x_all) & np.isfinite(y_all)
            x, y = x_all[ok], y_all[ok]
            constant = len(x) >= MIN_SAMPLES and (np.ptp(x) == 0 or np.ptp(y) == 0)
            rho, p = spearman(x, y) if len(x) >= MIN_SAMPLES else (float("nan"), float("nan"))
            block.append({"target": target, "statistic": col, "n": len(x), "rho": rho,
                          "p_value": p, "expected": _direction(expectations.get(col, 0)),
                          "constant": constant})
        adjusted = holm([r["p_value"] for r in block])
        for r, pa in zip(block, adjusted):
            r["p_holm"] = pa
            r["verdict"] = "constant" if r.pop("constant") else \
                verdict(r["rho"], pa, expectations.get(r["statistic"], 0), alpha)
        rows += block
    columns_out = ["target", "statistic", "n", "rho", "p_value", "p_holm", "expected", "verdict"]
    return pd.DataFrame(rows, columns=columns_out)
