"""Learned difficulty forecasters (ours): for one unlearning method, a scikit-learn model over
every difficulty estimate known before unlearning, and one that may also read the method's own
pilot (:mod:`cud.difficulty.pilot`).

**The model** is a ridge regression on rank-transformed features, fitted to the percentile rank
of the method's difficulty: missing values take the training median
(:class:`~sklearn.impute.SimpleImputer`), each feature is mapped to normal scores by its
training quantiles (:class:`~sklearn.preprocessing.QuantileTransformer`) and standardised, and
:class:`~sklearn.linear_model.RidgeCV` picks the penalty by efficient leave-one-out on the
training samples. Why this and not gradient boosting: a fit sees one anchor pool (200 samples,
160 without the anchors, on TOFU; 25 on the default run) and 20-40 strongly correlated features
(nine CUD variants, loss = -log prob, ...), and it is judged by Spearman's ρ on held-out
samples. A linear model on ranks has few effective parameters, its one setting is chosen in
closed form without a nested loop, it is deterministic and its coefficients can be read; rank
inputs make it indifferent to the heavy tails of gradient norm and MRD and to monotone
re-expressions of one quantity. Boosted trees would model interactions, but need hundreds of
samples and a search over depth, rate and leaves that a pool of 160-200 cannot support without
overfitting (``scripts/tofu_ladder.py --model boosting`` puts the two side by side on TOFU).

**Feature tiers** (what an estimate costs, cheapest first; :func:`tier_of`):

- ``free``: answer length, question length, question type (one-hot);
- ``one pass``: passes of the model before unlearning: loss, probability, exact memorisation,
  Min-K% (teacher-forced), gradient norm (a backward pass), MRD (K perturbed passes);
- ``circuits``: CUD and its variants (per-sample circuits + anchor circuits) and the
  circuit-structure statistics;
- ``pilot``: the method's own pilot at a fraction f of its steps (and the smaller fractions
  recorded on its way).

One forecaster per tier: ``forecast_free``, ``forecast_pass``, ``forecast_pre`` (every
pre-unlearning feature) and ``forecast_pilot_<f>`` (all of those and the pilot up to f).

**No held-out id reaches a fit**: :func:`fit_forecaster` trains on the ids it is given (the
anchor pool, whose outcomes were read anyway) and refuses any id of ``banned`` (the held-out
samples), and every transformation (median, quantiles, scale) is fitted inside the pipeline on
the training rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

#: fewest training samples a forecaster is fitted on (fewer: no forecast)
MIN_TRAIN = 8
#: the price tiers, cheapest first
TIERS = ("free", "one pass", "circuits", "pilot")
FREE = ("answer_length", "question_length", "question_type")
ONE_PASS = ("loss", "prob", "exact_mem", "min_k_prob", "grad_norm", "mrd")
#: estimates that are learned or chosen from others: never a forecaster's input
DERIVED = ("selected", "predictor", "combined", "random")
#: prefix of the one-hot question-type columns and of the structure statistics
TYPE_PREFIX, STRUCTURE_PREFIX = "qtype=", "s_"


def is_cud(name: str) -> bool:
    return name == "cud" or name.startswith("cud_") or name == "selected"


def is_pilot(name: str) -> bool:
    return name.startswith("pilot_")


def pilot_fraction(name: str) -> float:
    """``pilot_5`` -> 0.05."""
    return float(name[len("pilot_"):]) / 100


def tier_of(name: str) -> str:
    """The price tier of a single estimate or feature (see the module docstring)."""
    if name in FREE or name.startswith(TYPE_PREFIX):
        return "free"
    if name in ONE_PASS:
        return "one pass"
    if is_cud(name) or name.startswith(STRUCTURE_PREFIX):
        return "circuits"
    if is_pilot(name):
        return "pilot"
    return "one pass"   # another per-sample quantity of the model before unlearning


def forecaster_inputs(columns: Iterable[str]) -> dict[str, list[str]]:
    """``{forecaster name: its feature columns}`` for the columns available: one per tier, a
    pilot forecaster per pilot fraction (with every smaller fraction)."""
    cols = [c for c in columns if c not in DERIVED and not c.startswith("forecast")]
    by_tier = {t: [c for c in cols if tier_of(c) == t] for t in TIERS}
    out = {}
    free = by_tier["free"]
    passes = free + by_tier["one pass"]
    pre = passes + by_tier["circuits"]
    for name, feats, below in (("forecast_free", free, []),
                               ("forecast_pass", passes, free),
                               ("forecast_pre", pre, passes)):
        if feats and len(feats) > len(below):   # a tier that adds nothing is not refitted
            out[name] = feats
    pilots = sorted(by_tier["pilot"], key=pilot_fraction)
    for k, name in enumerate(pilots):
        out[f"forecast_{name}"] = pre + pilots[:k + 1]
    return out


def forecaster_tier(name: str) -> str:
    return {"forecast_free": "free", "forecast_pass": "one pass",
            "forecast_pre": "circuits"}.get(name, "pilot")


@dataclass
class ForecastFit:
    """A fitted forecaster: its predictions on the samples asked for (never trained on), the
    training ids, the columns it used, the ridge penalty and the standardised coefficients."""

    predictions: pd.Series
    train_ids: list[str]
    features: list[str]
    alpha: float = math.nan
    coefficients: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))


class HeldOutLeak(AssertionError):
    """A held-out id reached a forecaster's fit (a bug: the study must never let it)."""


def make_model(kind: str = "ridge", n_train: int = 100):
    """The scikit-learn pipeline of a forecaster (``ridge``, the default, see the module
    docstring; ``boosting``: :class:`~sklearn.ensemble.HistGradientBoostingRegressor` with
    small trees, for comparison)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import QuantileTransformer, StandardScaler
    quantiles = QuantileTransformer(n_quantiles=max(2, min(100, n_train)),
                                    output_distribution="normal")
    if kind == "ridge":
        return make_pipeline(SimpleImputer(strategy="median"), quantiles, StandardScaler(),
                             RidgeCV(alphas=np.logspace(-2, 4, 13)))
    if kind == "boosting":
        from sklearn.ensemble import HistGradientBoostingRegressor
        return make_pipeline(HistGradientBoostingRegressor(
            max_depth=2, learning_rate=0.05, max_iter=150, min_samples_leaf=10,
            l2_regularization=1.0, random_state=0))
    raise ValueError(f"unknown forecaster model '{kind}' (ridge, boosting)")


def fit_forecaster(features: pd.DataFrame, target: pd.Series, *, train: Iterable[str],
                   predict: Iterable[str], banned: Iterable[str] = (), kind: str = "ridge"
                   ) -> ForecastFit:
    """Fit on the ``train`` ids (those with a finite ``target``) and predict the ``predict``
    ids. ``features``: index id, numeric columns; columns constant or entirely missing on the
    training rows are dropped. ``target``: difficulty (higher = harder); the model fits its
    percentile rank, so predictions read "higher = harder" too. Raises :class:`HeldOutLeak`
    when a ``banned`` id is among the training ids. Fewer than :data:`MIN_TRAIN` training
    samples: all predictions NaN."""
    feats = features.copy()
    feats.index = feats.index.astype(str)
    tgt = target.copy()
    tgt.index = tgt.index.astype(str)
    banned = {str(i) for i in banned}
    train = [str(i) for i in train]
    leak = sorted(banned & set(train))
    if leak:
        raise HeldOutLeak(f"held-out id(s) {leak[:3]} reached a forecaster's fit")
    train = [i for i in dict.fromkeys(train) if i in feats.index and i in tgt.index
             and np.isfinite(tgt[i])]
    predict = [str(i) for i in predict if str(i) in feats.index]
    empty = pd.Series(np.nan, index=pd.Index(predict, name="id"), dtype=float)
    if len(train) < MIN_TRAIN:
        return ForecastFit(empty, train, [])
    x_train = feats.loc[train].astype(float)
    cols = [c for c in x_train.columns if x_train[c].notna().sum() >= 2
            and x_train[c].nunique(dropna=True) > 1]
    if not cols:
        return ForecastFit(empty, train, [])
    y = tgt.reindex(train).rank(pct=True).to_numpy()
    model = make_model(kind, len(train))
    model.fit(x_train[cols].to_numpy(), y)
    pred = pd.Series(model.predict(feats.loc[predict, cols].astype(float).to_numpy())
                     if predict else [], index=pd.Index(predict, name="id"), dtype=float)
    last = model[-1]
    alpha = float(getattr(last, "alpha_", math.nan))
    coef = pd.Series(getattr(last, "coef_", np.full(len(cols), np.nan)), index=cols,
                     name="coefficient", dtype=float)
    return ForecastFit(pred, train, cols, alpha, coef)


def one_hot_types(types: pd.Series) -> pd.DataFrame:
    """One 0/1 column per question type (``qtype=<type>``), index id; none without types."""
    types = types.astype(str)
    types = types[types != ""]
    if types.empty or types.nunique() < 2:
        return pd.DataFrame(index=types.index)
    frame = pd.get_dummies(types, prefix="qtype", prefix_sep="=").astype(float)
    frame.index.name = "id"
    return frame


def training_ids(pool: Sequence[str], anchors: Sequence[str], columns: Sequence[str]
                 ) -> list[str]:
    """The ids a forecaster trains on: the pool, less its anchors when a CUD feature is among
    ``columns`` (an anchor's distance to its own anchor circuit is biased towards its side)."""
    anchor_set = set(anchors)
    if any(is_cud(c) for c in columns) and len(pool) - len(anchor_set) >= MIN_TRAIN:
        return [i for i in pool if i not in anchor_set]
    return list(pool)
