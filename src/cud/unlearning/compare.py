"""Plain against a strategy: per method, the same forget set unlearned in two folders (one plain,
one with a strategy), compared sample by sample.

Per method (one row): the share forgotten (normalised answer probability below ``threshold``
after unlearning, with its Wilson 95% interval) overall and in the predicted-hard quartile (the quarter of the forget set
with the highest predicted difficulty), the mean retain NLL rise, the model utility (when
measured), and two paired tests against
plain: McNemar's exact test on forgotten / not (a two-sided binomial test on the discordant
samples, :func:`scipy.stats.binomtest`) and Wilcoxon's signed-rank test on the per-sample NLL
increase (:func:`scipy.stats.wilcoxon`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from cud.errors import StoreError

COMPARISON = "comparison.csv"


def _method_tables(root: Path, method: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    folder = root / method
    try:
        after = pd.read_parquet(folder / "after.parquet")
        outcomes = pd.read_parquet(folder / "outcomes.parquet")
        settings = json.loads((folder / "settings.json").read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{folder}: no finished {method} results ({type(e).__name__})") from None
    after = after.set_index("id") if "id" in after.columns else after
    outcomes = outcomes.set_index("id") if "id" in outcomes.columns else outcomes
    return after, outcomes, settings


def share_interval(forgotten: np.ndarray) -> tuple[float, float]:
    """Wilson 95% interval of a share of booleans (NaN, NaN for none)."""
    if len(forgotten) == 0:
        return math.nan, math.nan
    ci = stats.binomtest(int(forgotten.sum()), len(forgotten)).proportion_ci(0.95, "wilson")
    return float(ci.low), float(ci.high)


def mcnemar_p(plain: np.ndarray, strategy: np.ndarray) -> float:
    """Exact McNemar p of two paired boolean outcomes (1.0 when no sample differs)."""
    only_plain = int((plain & ~strategy).sum())
    only_strategy = int((strategy & ~plain).sum())
    n = only_plain + only_strategy
    return 1.0 if n == 0 else float(stats.binomtest(only_strategy, n, 0.5).pvalue)


def wilcoxon_p(plain: np.ndarray, strategy: np.ndarray) -> float:
    """Wilcoxon signed-rank p of paired values (NaN when every pair is equal)."""
    if np.allclose(plain, strategy, rtol=0, atol=0):
        return math.nan
    return float(stats.wilcoxon(strategy, plain).pvalue)


def compare_strategy(plain_root: str | Path, strategy_root: str | Path, methods: Sequence[str],
                     difficulty: pd.Series, threshold: float, strategy: str) -> pd.DataFrame:
    """One row per method (module docstring). ``difficulty``: predicted difficulty per forget
    sample id (higher = harder), which defines the hard quartile."""
    hard_cut = float(difficulty.quantile(0.75))
    hard = set(difficulty.index[difficulty >= hard_cut].astype(str))
    rows = []
    for method in methods:
        p_after, p_out, p_set = _method_tables(Path(plain_root), method)
        s_after, s_out, s_set = _method_tables(Path(strategy_root), method)
        ids = [i for i in p_after.index if i in s_after.index]
        in_hard = np.array([i in hard for i in ids])
        forgot_p = (p_after["prob"].reindex(ids) < threshold).to_numpy()
        forgot_s = (s_after["prob"].reindex(ids) < threshold).to_numpy()
        rows.append({
            "method": method, "strategy": strategy, "n": len(ids), "n_hard": int(in_hard.sum()),
            "forgotten_plain": float(forgot_p.mean()),
            "forgotten_strategy": float(forgot_s.mean()),
            "forgotten_hard_plain": float(forgot_p[in_hard].mean()) if in_hard.any() else None,
            "forgotten_hard_strategy": float(forgot_s[in_hard].mean())
            if in_hard.any() else None,
            **_intervals("forgotten_plain", forgot_p),
            **_intervals("forgotten_strategy", forgot_s),
            **_intervals("forgotten_hard_plain", forgot_p[in_hard]),
            **_intervals("forgotten_hard_strategy", forgot_s[in_hard]),
            "retain_rise_plain": p_set.get("retain_nll_delta_mean"),
            "retain_rise_strategy": s_set.get("retain_nll_delta_mean"),
            "utility_plain": (p_set.get("utility") or {}).get("model_utility"),
            "utility_strategy": (s_set.get("utility") or {}).get("model_utility"),
            "mcnemar_p": mcnemar_p(forgot_p, forgot_s),
            "mcnemar_p_hard": mcnemar_p(forgot_p[in_hard], forgot_s[in_hard]),
            "wilcoxon_p_nll_delta": wilcoxon_p(p_out["nll_delta"].reindex(ids).to_numpy(float),
                                               s_out["nll_delta"].reindex(ids).to_numpy(float)),
        })
    return pd.DataFrame(rows)


def _intervals(name: str, forgotten: np.ndarray) -> dict[str, float]:
    lo, hi = share_interval(forgotten)
    return {f"{name}_lo": lo, f"{name}_hi": hi}


def compare_to_folder(plain_root: str | Path, strategy_root: str | Path,
                      methods: Sequence[str], difficulty: pd.Series, threshold: float,
                      strategy: str) -> pd.DataFrame:
    """:func:`compare_strategy`, written to ``<strategy_root>/comparison.csv``."""
    table = compare_strategy(plain_root, strategy_root, methods, difficulty, threshold, strategy)
    table.to_csv(Path(strategy_root) / COMPARISON, index=False)
    return table
