"""Test-retest: does CUD agree with itself when the circuits are measured again?

Two circuits folders of the same samples that differ only in the random corrupted prompts
(``--seed``) are two independent measurements. With the *same* anchor samples, each folder
gives its own anchor circuits and its own CUD of every sample; their rank agreement on the
samples that are not anchors is the score's test-retest reliability, the ceiling of how well it
can correlate with anything. Reported for every variant, beside what the circuits themselves
share: the Jaccard overlap of a sample's two circuits against that of two different samples,
and the rank agreement of a sample's two edge-score vectors.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cud.difficulty.anchors import AnchorSet
from cud.difficulty.validation import bootstrap_draws, spearman_rows
from cud.difficulty.variants import CircuitData
from cud.errors import ConfigError
from cud.statistics import spearman

COLUMNS = ["quantity", "value", "lo", "hi", "n"]


def _interval(x: np.ndarray, y: np.ndarray, n_boot: int, ci: float, seed: int
              ) -> tuple[float, float]:
    if n_boot < 10 or len(x) < 3:
        return math.nan, math.nan
    draws = bootstrap_draws(len(x), n_boot, seed)
    boot = spearman_rows(x[draws], y[draws])
    boot = boot[np.isfinite(boot)]
    if not len(boot):  # a score constant in every resample (e.g. one side of a tiny run)
        return math.nan, math.nan
    a = (1 - ci) / 2
    return float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))


def circuit_agreement(first: CircuitData, second: CircuitData) -> dict[str, float]:
    """Mean Jaccard overlap of each sample's two circuits, of two different samples' circuits
    (first folder's sample i against the second's j != i), and the mean Spearman ρ of each
    sample's two |edge score| vectors."""
    a, b = first.circuits[first.size].float(), second.circuits[second.size].float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    jac = inter / union.clamp_min(1)
    same = float(jac.diagonal().mean())
    off = ~torch.eye(len(a), dtype=torch.bool)
    rho = np.nanmean([spearman(first.edge_scores[i].abs().numpy(),
                               second.edge_scores[i].abs().numpy())[0] for i in range(len(a))])
    return {"jaccard_same_sample": same, "jaccard_other_samples": float(jac[off].mean()),
            "edge_score_spearman": float(rho)}


def retest_table(first: CircuitData, second: CircuitData, anchors: AnchorSet,
                scores: Mapping[str, tuple[pd.Series, pd.Series]] | None = None, *,
                n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Test-retest table: for every variant in ``scores`` (``{name: (scores from the first
    folder, scores from the second)}``, both with ``anchors``), Spearman ρ between the two on
    the samples that are not anchors themselves, with a bootstrap interval; then the circuits'
    own agreement (:func:`circuit_agreement`)."""
    if first.ids != second.ids:
        raise ConfigError("test-retest needs the circuits of the same samples, in the same "
                          "order, in both folders")
    rows = []
    # outcomes play no part here, so only the anchors' own scores (biased towards their sides)
    # are left out, not the whole pool
    keep = [i for i in first.ids if i not in set(anchors.easy) | set(anchors.hard)]
    for name, (a, b) in (scores or {}).items():
        x = a.reindex(keep).to_numpy(dtype=float)
        y = b.reindex(keep).to_numpy(dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        rho = spearman(x[ok], y[ok])[0]
        lo, hi = _interval(x[ok], y[ok], n_boot, ci, seed)
        rows.append({"quantity": f"{name} test-retest spearman", "value": rho, "lo": lo,
                     "hi": hi, "n": int(ok.sum())})
    for name, value in circuit_agreement(first, second).items():
        rows.append({"quantity": name, "value": value, "lo": math.nan, "hi": math.nan,
                     "n": len(first.ids)})
    return pd.DataFrame(rows, columns=COLUMNS)


def retest_scores(first: CircuitData, second: CircuitData, anchors: AnchorSet,
                  variants: Sequence[str], compute) -> dict[str, tuple[pd.Series, pd.Series]]:
    """``{variant: (its scores on the first data, on the second)}`` for the variants ``compute``
    (``data -> {name: scores}``) produces."""
    a, b = compute(first), compute(second)
    return {v: (a[v], b[v]) for v in variants if v in a and v in b}
