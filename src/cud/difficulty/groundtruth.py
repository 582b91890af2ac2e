"""The unlearning ground truth as a per-sample *difficulty*: what anchors are chosen from and what
every difficulty metric is judged against.

Direction conventions, used everywhere in :mod:`cud.difficulty`:

- *forgetting* (of an outcome): higher = more forgotten by the unlearning run (easy);
- *difficulty* = -forgetting: higher = less forgotten (hard);
- a difficulty *metric* (CUD, a baseline) is read as "higher = predicted harder" once oriented;
  CUD is built that way (1 = at the hard anchor).

An *outcome* names one per-sample quantity of a ``cud unlearn`` table (:func:`forgetting`):
``{metric}_after`` (the raw value after unlearning, e.g. ``nll_after``: the reference code's
proxy), ``{metric}_delta`` (its change, less confounded by how well the sample was known before;
METHOD §9), or ``steps_to_forget`` (never forgotten = hardest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from cud.errors import DataError
from cud.unlearning.outcomes import METRICS

#: the reference code's proxy: the answer loss after unlearning
DEFAULT_ANCHOR_OUTCOME = "nll_after"
#: METHOD §9: judge against the raw post-unlearning loss and its change
DEFAULT_OUTCOMES = ("nll_after", "nll_delta")


def indexed_by_id(table: pd.DataFrame) -> pd.DataFrame:
    """A copy indexed by ``id`` as strings (from the index or an ``id`` column)."""
    if "id" in table.columns:
        table = table.set_index("id")
    table = table.copy()
    table.index = table.index.astype(str)
    table.index.name = "id"
    return table


def forgetting(table: pd.DataFrame, outcome: str = DEFAULT_ANCHOR_OUTCOME, *,
               source: str | None = None) -> pd.Series:
    """Per-sample forgetting score (higher = more forgotten) of ``outcome`` in an outcomes table
    (index or column ``id``). Samples without a value are dropped."""
    table = indexed_by_id(table)
    if outcome == "steps_to_forget":
        if outcome not in table:
            raise DataError("no steps_to_forget column (run `cud unlearn` with --eval-every)",
                            file=source, field=outcome)
        steps = table[outcome].astype(float)
        # never forgotten within the run: censored, ranks after every forgotten sample
        never = steps.max() + 1 if steps.notna().any() else 1.0
        return (-steps.fillna(never)).rename(outcome)
    metric, _, kind = outcome.rpartition("_")
    if kind not in ("after", "delta", "before") or metric not in METRICS:
        raise DataError(f"unknown outcome '{outcome}' (use <metric>_after, <metric>_delta or "
                        f"steps_to_forget; metrics: {', '.join(METRICS)})", file=source,
                        field=outcome)
    if outcome not in table:
        raise DataError(f"the outcomes table has no column '{outcome}'", file=source,
                        field=outcome)
    return (METRICS[metric].sign * table[outcome].astype(float)).dropna().rename(outcome)


def difficulty(table: pd.DataFrame, outcome: str = DEFAULT_ANCHOR_OUTCOME, *,
               source: str | None = None) -> pd.Series:
    """Per-sample ground-truth difficulty (higher = less forgotten = harder)."""
    return -forgetting(table, outcome, source=source)


def read_outcomes(folder: str | Path, methods: Iterable[str] | None = None
                  ) -> dict[str, pd.DataFrame]:
    """Per-method outcome tables of a ``cud unlearn`` folder: ``{method: table indexed by id}``
    from ``<folder>/<method>/outcomes.parquet``; ``methods`` picks and orders them."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError("no such unlearning output folder", file=str(root))
    found = {p.parent.name: p for p in sorted(root.glob("*/outcomes.parquet"))}
    if not found:
        raise DataError("no <method>/outcomes.parquet inside; run `cud unlearn --out` to make "
                        "one", file=str(root))
    wanted = list(methods) if methods else list(found)
    missing = [m for m in wanted if m not in found]
    if missing:
        raise DataError(f"no outcomes of method(s) {', '.join(missing)} (found: "
                        f"{', '.join(found)})", file=str(root))
    return {m: indexed_by_id(pd.read_parquet(found[m])) for m in wanted}


def difficulties(outcomes: Mapping[str, pd.DataFrame], outcome: str) -> dict[str, pd.Series]:
    """``{method: difficulty series}`` of one outcome definition for every method."""
    return {m: difficulty(t, outcome, source=m) for m, t in outcomes.items()}


def consensus_difficulty(outcomes: Mapping[str, pd.DataFrame], outcome: str) -> pd.Series:
    """Mean percentile rank of difficulty across methods (ids every method has): a single target
    when several methods define the anchors."""
    series = difficulties(outcomes, outcome)
    frame = pd.DataFrame(series).dropna()
    if frame.empty:
        raise DataError("the methods' outcome tables share no sample id")
    return frame.rank(pct=True).mean(axis=1).rename(f"consensus_{outcome}")


def common_ids(outcomes: Mapping[str, pd.DataFrame]) -> list[str]:
    """Ids present in every method's table, in the first table's order."""
    tables = list(outcomes.values())
    if not tables:
        return []
    shared = set(tables[0].index)
    for t in tables[1:]:
        shared &= set(t.index)
    return [i for i in tables[0].index if i in shared]


def seeded_random(ids: Iterable[str], seed: int = 0) -> pd.Series:
    """A seeded uniform score per id (the random ranking)."""
    ids = list(ids)
    return pd.Series(np.random.default_rng(seed).random(len(ids)),
                     index=pd.Index(ids, name="id"), name="random")
