"""Beyond the paper: a difficulty predictor fitted on circuit features (ours).

Features per sample (all computed before any unlearning):
- the distances to the anchor circuits, d_E and d_H, for every distance, binary and weighted;
- structure statistics of the sample's circuit (:mod:`cud.circuits.structure` when present, else
  a few layer statistics computed here from the graph's edge layers).

The model is a standardised ridge regression whose strength is chosen by cross-validation on
the training samples (scikit-learn's ``RidgeCV``, efficient leave-one-out), fitted to the
percentile rank of the ground-truth difficulty. It is trained only on samples that the held-out
statistics exclude anyway (the anchor pool: the same outcome information CUD's anchors were
chosen from), and its predictions on the held-out samples are judged with the same statistics as
CUD. The anchors themselves are left out of training when enough other pool samples exist,
because their distances to their own anchor circuits are biased towards 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from cud.circuits.graph import Graph
from cud.difficulty.anchors import AnchorCircuits
from cud.difficulty.score import DISTANCES, cud_scores
from cud.errors import ConfigError

#: fewer non-anchor pool samples than this and the anchors join the training set
MIN_TRAIN_WITHOUT_ANCHORS = 10


def layer_statistics(graph: Graph, circuits: np.ndarray) -> pd.DataFrame:
    """Simple per-circuit layer statistics from the graph's edge layers (the fallback when
    :mod:`cud.circuits.structure` is missing). ``circuits``: (N, E) bool."""
    c = np.asarray(circuits, dtype=np.float64)
    parent = graph.forward_layer[graph.edge_parent].astype(np.float64)   # input at -1
    child = graph.backward_layer[graph.edge_child].astype(np.float64)    # logits at L
    span = child - parent
    late = (3 * child >= 2 * graph.n_layers).astype(np.float64)
    n = c.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({
            "n_edges": n,
            "edge_span_mean": c @ span / n,
            "edge_span_max": np.where(c > 0, span, -np.inf).max(1),
            "edge_layer_mean": c @ child / n,
            "parent_layer_mean": c @ parent / n,
            "last_third_edge_share": c @ late / n,
        })


def structure_features(graph: Graph, circuits) -> pd.DataFrame:
    """Structure statistics of (N, E) circuits, from :mod:`cud.circuits.structure` if present."""
    arr = circuits.numpy() if isinstance(circuits, Tensor) else np.asarray(circuits)
    try:
        from cud.circuits.structure import structure_statistics
    except ImportError:
        return layer_statistics(graph, arr.astype(bool))
    return structure_statistics(graph, arr.astype(bool)).reset_index(drop=True)


def circuit_features(ids: Sequence[str], edge_scores: Tensor, anchors: AnchorCircuits, *,
                     circuits: Tensor | None = None, structure: pd.DataFrame | None = None
                     ) -> pd.DataFrame:
    """Feature table (index id): d_E and d_H for every distance, binary and weighted, plus the
    structure statistics of each sample's circuit (``structure``, rows in ``ids`` order, when
    already computed). Constant columns are dropped."""
    from cud.circuits.selection import select
    if circuits is None:
        circuits = select(anchors.graph, edge_scores, anchors.selection)
    cols = {}
    for name in DISTANCES:
        for weighted in (False, True):
            _, d_e, d_h = cud_scores(edge_scores, anchors, distance_name=name,
                                     weighted=weighted, circuits=circuits)
            tag = f"{name}{'_w' if weighted else ''}"
            cols[f"d_E_{tag}"] = d_e.numpy()
            cols[f"d_H_{tag}"] = d_h.numpy()
    table = pd.DataFrame(cols)
    if structure is None:
        structure = structure_features(anchors.graph, circuits)
    table = pd.concat([table, structure.reset_index(drop=True).add_prefix("s_")], axis=1)
    table.index = pd.Index(list(ids), name="id")
    table = table.astype(float)
    varying = [c for c in table.columns if table[c].nunique(dropna=True) > 1]
    return table[varying]


@dataclass
class PredictorFit:
    """A fitted predictor: its held-out predictions and how it was trained."""

    predictions: pd.Series        # index id; every sample that was not trained on
    train_ids: list[str]
    alpha: float                  # the ridge strength cross-validation chose
    coefficients: pd.Series       # per (standardised) feature
    features: list[str]


def fit_predictor(features: pd.DataFrame, target: pd.Series, *, train: Iterable[str],
                  anchors: Iterable[str] = (), alphas: Sequence[float] | None = None
                  ) -> PredictorFit:
    """Fit on ``train`` ids (less ``anchors`` when at least
    :data:`MIN_TRAIN_WITHOUT_ANCHORS` others remain) and predict every other sample of
    ``features``. ``target``: ground-truth difficulty (higher = harder); the model fits its
    percentile rank, so predictions read "higher = harder" too."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = [str(i) for i in train]
    anchor_ids = {str(i) for i in anchors}
    others = [i for i in train if i not in anchor_ids]
    if len(others) >= MIN_TRAIN_WITHOUT_ANCHORS:
        train = others
    feats = features.copy()
    feats.index = feats.index.astype(str)
    tgt = target.copy()
    tgt.index = tgt.index.astype(str)
    train = [i for i in train if i in feats.index and i in tgt.index and np.isfinite(tgt[i])]
    if len(train) < 4:
        raise ConfigError(f"the predictor needs at least 4 training samples with outcomes, got "
                          f"{len(train)}; raise the anchor pool")
    cols = [c for c in feats.columns if feats.loc[train, c].notna().all()
            and feats.loc[train, c].nunique() > 1]
    x = feats[cols].fillna(feats.loc[train, cols].median())
    y = tgt.reindex(train).rank(pct=True).to_numpy()
    grid = np.asarray(alphas if alphas is not None else np.logspace(-2, 4, 13), dtype=float)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=grid))
    model.fit(x.loc[train].to_numpy(), y)
    rest = [i for i in x.index if i not in set(train)]
    pred = pd.Series(model.predict(x.loc[rest].to_numpy()) if rest else [],
                     index=pd.Index(rest, name="id"), name="predictor", dtype=float)
    ridge = model[-1]
    return PredictorFit(predictions=pred, train_ids=train, alpha=float(ridge.alpha_),
                        coefficients=pd.Series(ridge.coef_, index=cols, name="coefficient"),
                        features=cols)
