"""The forecast ladder (ours): for each unlearning method, every difficulty estimate at its price,
judged on held-out samples over the study's anchor pools (``validation/ladder.csv``).

"Which of my samples will survive method M?" has answers at very different prices: free
(answer and question length, question type), one pass of the model (loss, probability, Min-K%,
gradient norm, MRD), circuits (CUD and its variants), a pilot of M itself (a fraction of its
steps), and learned forecasters over each tier (:mod:`cud.difficulty.forecast`). For each method
and each anchor pool the ladder takes *that method's* anchors and pool, orients every single
estimate from those anchors (as the study does), fits each forecaster on the pool's samples only
and judges everything on the held-out rest with the study's statistics: Spearman ρ per pool,
bootstrap replicates drawn with the same indices for every estimate of a pool (so differences
are paired), the mean over pools, a pooled interval, and the paired test of each estimate
against the best single baseline of that method (the highest mean ρ among the estimates that
are neither CUD nor a pilot nor learned: the choice favours the baseline).

An estimate's price is seconds per sample measured where it was made (:mod:`cud.prices`):
the baselines stage for loss-type metrics (one teacher-forced pass shared by loss, probability
and exact memorisation), gradient norm and MRD; the circuits stage plus the anchor scoring for
CUD; the pilot stage for a pilot at f; zero for the free estimates. A forecaster costs the sum
of the distinct computations its features need (a pilot to f also records every smaller f).
What the anchor pool's outcomes cost (the unlearning that defines the anchors and trains the
forecasters) is common to every estimate here and not counted in any price.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cud.difficulty.forecast import (DERIVED, TIERS, fit_forecaster,
                                     forecaster_inputs, forecaster_tier, is_cud, is_pilot,
                                     pilot_fraction, tier_of, training_ids)
from cud.difficulty.validation import (bootstrap_draws, held_out_pairs, orientation,
                                       paired_difference, pooled_interval, replicates)

COLUMNS = ["method", "outcome", "estimate", "kind", "tier", "seconds_per_sample",
           "share_of_method", "steps", "n", "pools", "spearman", "spearman_sd", "spearman_lo",
           "spearman_hi", "versus", "diff", "diff_lo", "diff_hi", "p", "pools_won", "n_features",
           "collapsed"]


@dataclass
class PoolView:
    """One anchor pool seen from one method. ``pool``: every id whose outcome was read to make
    the anchors (the only ids a forecaster may train on); ``easy``/``hard``: this method's
    anchors in it (they orient the single estimates); ``held``: the held-out ids judged;
    ``scores``: index id, one column per single estimate as scored in this pool (CUD with these
    anchors, baselines, pilots, ...); ``features``: more forecaster inputs that are not judged on
    their own (structure statistics ``s_*``, one-hot question types ``qtype=*``)."""

    seed: int
    pool: list[str]
    easy: list[str]
    hard: list[str]
    held: list[str]
    scores: pd.DataFrame
    features: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class Prices:
    """Seconds per sample: ``estimates`` (``{name: s}``: the baselines' own, ``circuits`` for a
    sample's circuit, ``cud_scoring`` for its CUD once the anchor circuits exist), ``pilots``
    (``{method: {pilot_<f>: s}}``), ``pilot_steps`` (``{method: {pilot_<f>: step}}``,
    ``total_steps`` ``{method: steps}``) and ``methods`` (``{method: s}``, a full unlearning
    with its evaluation: the denominator of ``share_of_method``)."""

    estimates: dict[str, float] = field(default_factory=dict)
    pilots: dict[str, dict[str, float]] = field(default_factory=dict)
    pilot_steps: dict[str, dict[str, int]] = field(default_factory=dict)
    total_steps: dict[str, int] = field(default_factory=dict)
    methods: dict[str, float] = field(default_factory=dict)

    def component(self, name: str) -> str:
        """The computation an estimate or feature comes from."""
        if name in ("loss", "prob", "exact_mem"):
            return "teacher_forced"
        if is_cud(name) or name.startswith("s_"):
            return "circuits"
        if is_pilot(name):
            return "pilot"
        if tier_of(name) == "free":
            return "free"
        return name

    def of_component(self, component: str, method: str, pilot: str | None = None) -> float:
        e = self.estimates
        if component == "free":
            return 0.0
        if component == "teacher_forced":
            values = [e[k] for k in ("loss", "prob", "exact_mem") if k in e]
            return values[0] if values else math.nan
        if component == "circuits":
            return e.get("circuits", math.nan) + e.get("cud_scoring", 0.0)
        if component == "pilot":
            return self.pilots.get(method, {}).get(pilot, math.nan)
        return e.get(component, math.nan)

    def of(self, columns: Sequence[str], method: str) -> float:
        """Seconds per sample of an estimate made from ``columns`` (a single estimate: one)."""
        parts = {self.component(c) for c in columns}
        pilots = [c for c in columns if is_pilot(c)]
        total = 0.0
        for part in parts:
            top = max(pilots, key=pilot_fraction) if part == "pilot" else None
            total += self.of_component(part, method, top)
        return total


@dataclass
class ForecastInputs:
    """What the study's ladder needs beyond the circuits, outcomes and baselines: each method's
    pilot scores (``{method: table}``, index id, columns ``pilot_<f>``), the prices, and the
    unlearning stage's flags per method (``{method: {"collapsed": bool, ...}}``,
    :func:`cud.unlearning.folder.method_flags`)."""

    pilots: dict[str, pd.DataFrame] = field(default_factory=dict)
    prices: Prices = field(default_factory=Prices)
    flags: dict[str, dict] = field(default_factory=dict)

    def collapsed(self) -> dict[str, bool]:
        return {m: bool(f.get("collapsed", False)) for m, f in self.flags.items()}


def estimate_kind(name: str) -> str:
    if name.startswith("forecast"):
        return "forecaster"
    if is_pilot(name):
        return "pilot"
    if is_cud(name):
        return "cud"
    return "baseline"


def _steps(prices: Prices, method: str, name: str) -> str:
    pilot = name[len("forecast_"):] if name.startswith("forecast_pilot") else name
    step = prices.pilot_steps.get(method, {}).get(pilot)
    total = prices.total_steps.get(method)
    return f"{step} of {total}" if step is not None and total is not None else ""


def _forecast_table(view: PoolView) -> pd.DataFrame:
    """The forecasters' inputs of one pool: the single estimates less the derived ones and the
    question type's pool mean (its one-hot columns are in ``features``), the features, and no
    pilot fraction that repeats a smaller one (a short run puts several on one step)."""
    table = pd.concat([view.scores.drop(columns=[c for c in view.scores.columns
                                                  if c in DERIVED or c == "question_type"]),
                       view.features], axis=1)
    pilots = sorted((c for c in table.columns if is_pilot(c)), key=pilot_fraction)
    repeats = [c for k, c in enumerate(pilots)
               if any(table[c].equals(table[q]) for q in pilots[:k])]
    return table.drop(columns=repeats)


def pool_forecasts(view: PoolView, target: pd.Series, kind: str) -> tuple[pd.DataFrame, dict]:
    """Every forecaster's predictions on the held-out ids of one pool, and what was fitted."""
    table = _forecast_table(view)
    anchors = view.easy + view.hard
    out, info = pd.DataFrame(index=pd.Index(view.held, name="id")), {}
    for name, cols in forecaster_inputs(table.columns).items():
        train = training_ids(view.pool, anchors, cols)
        fit = fit_forecaster(table[cols], target, train=train, predict=view.held,
                             banned=view.held, kind=kind)
        out[name] = fit.predictions.reindex(out.index)
        info[name] = {"train_ids": fit.train_ids, "features": fit.features, "alpha": fit.alpha,
                      "coefficients": fit.coefficients.round(4).to_dict()}
    return out, info


def ladder_table(views: Mapping[str, Sequence[PoolView]],
                 truths: Mapping[tuple[str, str], pd.Series], *, prices: Prices | None = None,
                 collapsed: Mapping[str, bool] | None = None, n_boot: int = 1000,
                 ci: float = 0.95, kind: str = "ridge") -> tuple[pd.DataFrame, dict]:
    """The ladder (see the module docstring): one row per (method, outcome, estimate), and the
    forecasters' fits of each method's first pool (``{method: {outcome: {forecaster: ...}}}``).

    ``views``: ``{method: [PoolView per pool]}``; ``truths``: ``{(method, outcome):
    difficulty}``, in the study's order (the k-th truth of pool seed s draws its bootstrap
    indices with seed 1000 s + k, as the study does, so the single estimates' statistics equal
    the study's). Each forecaster is fitted on the pool's ids to the very truth it is judged
    against."""
    prices = prices or Prices()
    collapsed = dict(collapsed or {})
    rows, fits = [], {}
    order = list(truths)
    for (method, outcome), truth in truths.items():
        t = order.index((method, outcome))
        per: dict[str, list] = {}
        for v_index, view in enumerate(views.get(method, [])):
            forecasts, info = pool_forecasts(view, truth, kind)
            if v_index == 0:
                fits.setdefault(method, {})[outcome] = info
            signs = orientation(view.scores, view.easy, view.hard)
            ids = sorted(i for i in view.held if i in truth.index and np.isfinite(truth[i]))
            draws = bootstrap_draws(len(ids), n_boot if len(ids) >= 3 else 0,
                                    1_000 * view.seed + t)
            columns = {**{c: int(signs.get(c, 1)) * view.scores[c].astype(float)
                          for c in view.scores.columns if c not in DERIVED or c == "selected"},
                       **{c: forecasts[c] for c in forecasts.columns}}
            for name, values in columns.items():
                pairs = held_out_pairs(values, truth, excluded=view.pool)
                if pairs.ids == tuple(ids):
                    rep = replicates(pairs.metric, pairs.truth, draws)
                    rep.shared = True
                else:   # values missing for some samples: never paired
                    own = bootstrap_draws(len(pairs), n_boot if len(pairs) >= 3 else 0,
                                          1_000 * view.seed + t + 1)
                    rep = replicates(pairs.metric, pairs.truth, own)
                    rep.shared = False
                per.setdefault(name, []).append(rep)
        if not per:
            continue
        n_pools = len(views.get(method, []))
        singles = {name: reps for name, reps in per.items()
                   if estimate_kind(name) == "baseline" and len(reps) == n_pools}
        means = {name: _mean([r.spearman for r in reps]) for name, reps in singles.items()}
        means = {k: v for k, v in means.items() if np.isfinite(v)}
        best = max(means, key=means.get) if means else None
        for name, reps in per.items():
            rho = np.array([r.spearman for r in reps], dtype=float)
            lo, hi = pooled_interval([r.boot_spearman for r in reps], ci)
            test = {"diff": math.nan, "diff_lo": math.nan, "diff_hi": math.nan, "p": math.nan}
            won = math.nan
            if best is not None and name != best and len(reps) == n_pools and \
                    all(r.shared for r in reps) and all(r.shared for r in per[best]):
                test = paired_difference(np.concatenate([r.boot_spearman for r in reps]),
                                         np.concatenate([r.boot_spearman
                                                         for r in per[best]]), ci)
                won = float(np.mean([a.spearman > b.spearman for a, b in zip(reps, per[best])]))
            kind_ = estimate_kind(name)
            if kind_ == "forecaster":
                cols = _forecast_columns(views[method][0], name)
                price = prices.of(cols, method)
                tier, n_features = forecaster_tier(name), len(cols)
            else:
                price = prices.of([name], method)
                tier, n_features = tier_of(name), 1
            cost = prices.methods.get(method, math.nan)
            rows.append({
                "method": method, "outcome": outcome, "estimate": name, "kind": kind_,
                "tier": tier, "seconds_per_sample": price,
                "share_of_method": price / cost if cost and np.isfinite(cost) else math.nan,
                "steps": _steps(prices, method, name),
                "n": int(round(np.mean([r.n for r in reps]))), "pools": len(reps),
                "spearman": _mean(rho), "spearman_sd": _sd(rho), "spearman_lo": lo,
                "spearman_hi": hi, "versus": best or "", **test, "pools_won": won,
                "n_features": n_features, "collapsed": bool(collapsed.get(method, False))})
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table, fits


def _forecast_columns(view: PoolView, name: str) -> list[str]:
    return forecaster_inputs(_forecast_table(view).columns).get(name, [])


def _mean(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


def _sd(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else math.nan


def tier_label(row) -> str:
    """``free``, ``one pass``, ``circuits`` or ``pilot at 5 %`` for a ladder row."""
    if row["tier"] != "pilot":
        return str(row["tier"])
    name = row["estimate"][len("forecast_"):] if row["kind"] == "forecaster" \
        else row["estimate"]
    return f"pilot at {pilot_fraction(name) * 100:g} %"


def best_per_tier(ladder: pd.DataFrame, outcome: str) -> pd.DataFrame:
    """Per method, the estimate with the highest mean held-out ρ at each price tier: among the
    estimates of that tier or a cheaper one (what that price can buy), each pilot fraction its
    own tier. Rows of the ladder, with a ``tier_label`` column, in price order."""
    if ladder.empty:
        return ladder
    rows = ladder[ladder["outcome"] == outcome].copy()
    rows["tier_label"] = [tier_label(r) for _, r in rows.iterrows()]
    rank = {t: k for k, t in enumerate(TIERS)}

    def level(r) -> tuple[int, float]:
        if r["tier"] != "pilot":
            return rank[r["tier"]], 0.0
        name = r["estimate"][len("forecast_"):] if r["kind"] == "forecaster" else r["estimate"]
        return rank["pilot"], pilot_fraction(name)

    rows["level"] = [level(r) for _, r in rows.iterrows()]
    out = []
    for method, group in rows.groupby("method", sort=False):
        for lvl in sorted(set(group["level"])):
            within = group[group["level"] <= lvl].dropna(subset=["spearman"])
            if within.empty:
                continue
            # ties go to the cheaper estimate
            best = within.sort_values(["spearman", "seconds_per_sample"],
                                      ascending=[False, True], kind="stable").iloc[0].copy()
            best["tier_label"] = group[group["level"] == lvl]["tier_label"].iloc[0]
            out.append(best)
    return pd.DataFrame(out).drop(columns="level").reset_index(drop=True) if out else \
        rows.iloc[0:0]
