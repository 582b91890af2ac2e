"""Rank correlation with its guards, written once for every floor that needs it (validation,
the structure analysis, the report's figure titles)."""

from __future__ import annotations

import math

import numpy as np

#: fewest pairs a rank correlation is computed on
MIN_PAIRS = 3


def spearman(x, y) -> tuple[float, float]:
    """(Spearman ρ, two-sided p) over the pairs where both values are finite; (NaN, NaN) with
    fewer than :data:`MIN_PAIRS` pairs or when either side is constant."""
    from scipy import stats
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < MIN_PAIRS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    r = stats.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def constant(x) -> bool:
    """Whether the finite values of ``x`` are all equal (nothing to rank)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return len(x) > 0 and np.ptp(x) == 0
