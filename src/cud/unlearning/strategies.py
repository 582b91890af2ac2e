"""Strategies: how the training loop spends a method's step budget, given plain data about the
forget set. A strategy wraps any of the six methods (it is not a seventh method) and receives
only a difficulty per sample id (higher = harder to forget), or a boolean mask per parameter; it
never imports the stage that computed them.

- ``plain``: the loop as it always was (no plan).
- ``reweight``: sample i's loss weighted by w_i (the method's weighted mean over samples,
  :func:`cud.unlearning.methods.base.sample_mean`), with z_i its difficulty standardised over
  the forget set (mean 0, sd 1; all 0 when every difficulty is the same)::

      w_i = clip(exp(z_i) / mean_j exp(z_j), w_min, w_max)

  normalised and clipped again until the mean is 1 and every weight in [w_min, w_max] (both
  hold since w_min <= 1 <= w_max); the hardest samples weigh most; defaults
  ``reweight_min`` 0.25, ``reweight_max`` 4 (:class:`cud.unlearning.folder.UnlearningSettings`).
- ``curriculum`` (RUM's refinement, Zhao et al. 2024): the forget set sorted by difficulty and
  cut into tertiles, unlearned one after another within the same total step budget (steps in
  proportion to the tertiles' sizes, one schedule); ``easy-to-hard`` (RUM's best, the default)
  or ``hard-to-easy``.
- ``focus``: every ``focus_every`` steps (default 5) each forget sample's teacher-forced
  probability is read again and only those still at or above the forgotten threshold (the
  ``threshold`` the outcomes use) are trained on; needs no forecast.
- ``localize``: only the top-k components (attention heads as their q/k/v/o slices, MLP blocks)
  of the forget set's circuits move (:mod:`cud.unlearning.localize`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cud.errors import ConfigError
from cud.unlearning.loop import TrainPlan

#: strategy name -> what it does (``--strategy``)
STRATEGIES: dict[str, str] = {
    "plain": "the methods as they are",
    "reweight": "each forget sample's loss weighted by its difficulty",
    "curriculum": "difficulty tertiles unlearned one after another",
    "focus": "every k steps, train only on samples not yet forgotten",
    "localize": "only the parameters of the forget set's top circuit components move",
}
#: strategies that read a difficulty per sample
NEEDS_DIFFICULTY = ("reweight", "curriculum")
#: curriculum orders
ORDERS = ("easy-to-hard", "hard-to-easy")
#: difficulty computed by the run instead of read from a table: minus the answer NLL before
#: unlearning (a well-known answer is taken as hard to forget)
COMPUTED = ("loss",)


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{name}' (choose from {', '.join(STRATEGIES)})")


def reweight(difficulty: Mapping[str, float], w_min: float, w_max: float) -> dict[str, float]:
    """Per-sample loss weights from difficulties (module docstring's formula)."""
    ids = list(difficulty)
    d = np.array([float(difficulty[i]) for i in ids])
    sd = d.std()
    z = (d - d.mean()) / sd if sd > 0 else np.zeros_like(d)
    w = np.exp(z)
    for _ in range(100):  # normalise and clip alternately until both hold
        w = np.clip(w / w.mean(), w_min, w_max)
        if abs(w.mean() - 1.0) < 1e-12:
            break
    return dict(zip(ids, w.tolist()))


def tertiles(difficulty: Mapping[str, float], order: str = "easy-to-hard") -> list[list[str]]:
    """The ids in three near-equal groups by difficulty (ties broken by id), easiest group
    first for ``easy-to-hard``, hardest first for ``hard-to-easy``."""
    if order not in ORDERS:
        raise ConfigError(f"unknown curriculum order '{order}' (choose from {', '.join(ORDERS)})")
    ranked = sorted(difficulty, key=lambda i: (float(difficulty[i]), i))
    groups = [list(g) for g in np.array_split(np.array(ranked, dtype=object), 3)]
    return groups if order == "easy-to-hard" else groups[::-1]


def plan(strategy: str, *, difficulty: Mapping[str, float] | None = None,
         masks: Mapping | None = None, threshold: float, reweight_min: float,
         reweight_max: float, order: str, focus_every: int) -> TrainPlan | None:
    """The loop's :class:`TrainPlan` for ``strategy`` (None for plain); the settings' defaults
    are those of :class:`cud.unlearning.folder.UnlearningSettings`."""
    check_strategy(strategy)
    if strategy in NEEDS_DIFFICULTY and difficulty is None:
        raise ConfigError(f"strategy '{strategy}' needs a difficulty per sample (--difficulty)")
    if strategy == "plain":
        return None
    if strategy == "reweight":
        return TrainPlan(weights=reweight(difficulty, reweight_min, reweight_max))
    if strategy == "curriculum":
        return TrainPlan(stages=tertiles(difficulty, order))
    if strategy == "focus":
        return TrainPlan(focus_every=focus_every, focus_threshold=threshold)
    if masks is None:
        raise ConfigError("strategy 'localize' needs the forget set's circuits "
                          "(unlearning.circuits)")
    return TrainPlan(masks=masks)


def read_difficulty(source: str, forget_ids: Sequence[str],
                    before: pd.DataFrame | None = None) -> pd.Series:
    """Difficulty per forget-sample id (higher = harder) from ``source``: ``TABLE:COLUMN`` (a
    .csv or .parquet file with an ``id`` column or index) or ``loss`` (minus the answer NLL in
    ``before``, the outcomes before unlearning). Refuses a table that misses forget samples."""
    if source in COMPUTED:
        if before is None or "nll" not in before.columns:
            raise ConfigError(f"difficulty '{source}' needs the forget set's NLL before "
                              f"unlearning")
        values = -before["nll"].astype(float)
        where = f"difficulty '{source}'"
    else:
        table, sep, column = source.rpartition(":")
        if not sep or not table or not column:
            raise ConfigError(f"difficulty '{source}': give TABLE:COLUMN (a .csv or .parquet "
                              f"file and one of its columns) or one of {', '.join(COMPUTED)}")
        path = Path(table)
        if not path.is_file():
            raise ConfigError(f"difficulty {path}: no such file")
        try:
            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception as e:  # pandas raises many kinds on a bad file
            raise ConfigError(f"difficulty {path}: unreadable ({type(e).__name__})") from None
        if "id" in frame.columns:
            frame = frame.set_index(frame["id"].astype(str))
        elif frame.index.name != "id":
            raise ConfigError(f"difficulty {path}: no 'id' column")
        if column not in frame.columns:
            raise ConfigError(f"difficulty {path}: no column '{column}' (it has: "
                              f"{', '.join(map(str, frame.columns))})")
        if frame.index.duplicated().any():
            raise ConfigError(f"difficulty {path}: id "
                              f"{frame.index[frame.index.duplicated()][0]} appears twice")
        values = pd.to_numeric(frame[column], errors="coerce")
        where = f"difficulty {path}:{column}"
    values.index = values.index.astype(str)
    values = values.reindex([str(i) for i in forget_ids])
    missing = int(values.isna().sum())
    if missing:
        raise ConfigError(f"{where}: {missing} of the {len(forget_ids)} forget samples have no "
                          f"value")
    return values.rename("difficulty")


def difficulty_hash(values: pd.Series) -> str:
    """Identifies a difficulty per id (ids and values, in id order)."""
    text = pd.Series(values.to_numpy(float), index=values.index).sort_index().to_csv()
    return hashlib.sha256(text.encode()).hexdigest()[:16]
