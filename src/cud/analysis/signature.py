"""The structure analysis of ``cud analyze``: do easy and hard samples' circuits differ the way
the paper says (METHOD §8: easy = short, shallow, early-to-middle; hard = long, deep, late)?

Three looks at the per-circuit statistics of :mod:`cud.circuits.structure`:
1. easy against hard *anchors* (Mann-Whitney U, Cliff's delta);
2. *CUD-easy* against *CUD-hard* samples (lowest and highest third by CUD; anchors left out by
   default so the two comparisons use disjoint samples);
3. Spearman correlation of every statistic with CUD and with each unlearning outcome, every
   target read as a difficulty (higher = harder).
The answer may be no: every row carries a verdict (see :mod:`cud.analysis.compare`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from cud.analysis.compare import VERDICTS, compare_groups, correlations, cud_groups
from cud.circuits.structure import STATISTICS

#: the paper's claim as an expectation per statistic (+1 = higher in hard circuits)
PAPER_EXPECTATIONS: dict[str, int] = {name: sign for name, (_, sign) in STATISTICS.items()}


def anchor_ids(anchors) -> dict[str, list[str]]:
    """``{"easy": [...], "hard": [...]}`` from a mapping or an object with ``easy``/``hard``
    (e.g. :class:`cud.difficulty.anchors.AnchorSet`)."""
    if isinstance(anchors, Mapping):
        easy, hard = anchors.get("easy", []), anchors.get("hard", [])
    else:
        easy, hard = getattr(anchors, "easy"), getattr(anchors, "hard")
    return {"easy": [str(i) for i in easy], "hard": [str(i) for i in hard]}


@dataclass
class StructureAnalysis:
    """The tables of one analysis. A comparison or the correlations are None when their input
    (anchors, CUD, outcomes) was not given; ``notes`` says what was left out and why."""

    statistics: pd.DataFrame                       # one row per sample, index id
    anchors: pd.DataFrame | None = None            # easy vs hard anchors (compare_groups)
    cud: pd.DataFrame | None = None                # CUD-easy vs CUD-hard (compare_groups)
    correlations: pd.DataFrame | None = None       # long table (compare.correlations)
    groups: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per comparison (and per correlation target), how many statistics with a claim got
        each verdict."""
        out: dict[str, dict[str, int]] = {}
        claimed = [s for s, sign in PAPER_EXPECTATIONS.items() if sign]
        for name, table in (("anchors", self.anchors), ("cud", self.cud)):
            if table is not None and not table.empty:
                verdicts = table.loc[[s for s in claimed if s in table.index], "verdict"]
                out[name] = {v: int((verdicts == v).sum()) for v in VERDICTS
                             if (verdicts == v).any()}
        if self.correlations is not None:
            for target, block in self.correlations.groupby("target", sort=False):
                verdicts = block.loc[block["statistic"].isin(claimed), "verdict"]
                out[f"rho: {target}"] = {v: int((verdicts == v).sum()) for v in VERDICTS
                                         if (verdicts == v).any()}
        return out

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``structure.parquet``/``.csv``, ``compare_anchors.csv``, ``compare_cud.csv``,
        ``correlations.csv`` (those that exist) and ``summary.json``; returns the paths."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        written = [root / "structure.parquet", root / "structure.csv"]
        self.statistics.to_parquet(written[0])
        self.statistics.to_csv(written[1])
        for name, table in (("compare_anchors", self.anchors), ("compare_cud", self.cud)):
            if table is not None:
                table.to_csv(root / f"{name}.csv")
                written.append(root / f"{name}.csv")
        if self.correlations is not None:
            self.correlations.to_csv(root / "correlations.csv", index=False)
            written.append(root / "correlations.csv")
        meta = {"summary": self.summary(), "notes": self.notes,
                "groups": {k: {g: len(v) for g, v in d.items()} for k, d in self.groups.items()},
                "statistics": {k: v[0] for k, v in STATISTICS.items()},
                "expectations": PAPER_EXPECTATIONS}
        (root / "summary.json").write_text(json.dumps(meta, indent=1) + "\n")
        written.append(root / "summary.json")
        return written


def analyze_structure(statistics: pd.DataFrame, *, anchors=None, cud: pd.Series | None = None,
                      difficulties: Mapping[str, pd.Series] | None = None,
                      fraction: float = 1 / 3, exclude_anchors: bool = True,
                      alpha: float = 0.05, columns: Sequence[str] | None = None
                      ) -> StructureAnalysis:
    """Compare and correlate the per-circuit ``statistics`` (index: id).

    ``anchors``: easy/hard anchor ids (mapping or AnchorSet); ``cud``: CUD per id (high = hard);
    ``difficulties``: per outcome name (e.g. ``"graddiff nll_delta"``) a per-id difficulty
    (higher = less forgotten = harder); ``fraction``: share of samples in each CUD group."""
    statistics = statistics.copy()
    statistics.index = statistics.index.astype(str)
    result = StructureAnalysis(statistics=statistics)
    expect = PAPER_EXPECTATIONS
    known = set(statistics.index)
    anchor_set: dict[str, list[str]] = {"easy": [], "hard": []}
    if anchors is not None:
        anchor_set = anchor_ids(anchors)
        missing = [i for i in anchor_set["easy"] + anchor_set["hard"] if i not in known]
        if missing:
            result.notes.append(f"{len(missing)} anchor(s) have no circuit and are left out")
        result.groups["anchors"] = anchor_set
        result.anchors = compare_groups(statistics, anchor_set["easy"], anchor_set["hard"],
                                        expectations=expect, alpha=alpha, columns=columns)
    else:
        result.notes.append("no anchors given: easy vs hard anchors not compared")
    targets = {}
    if cud is not None:
        cud = cud.copy()
        cud.index = cud.index.astype(str)
        skip = anchor_set["easy"] + anchor_set["hard"] if exclude_anchors else []
        groups = cud_groups(cud[cud.index.isin(known)], fraction, exclude=skip)
        result.groups["cud"] = groups
        result.cud = compare_groups(statistics, groups["easy"], groups["hard"],
                                    expectations=expect, alpha=alpha, columns=columns)
        targets["cud"] = cud
    else:
        result.notes.append("no CUD scores given: CUD-easy vs CUD-hard not compared")
    for name, series in (difficulties or {}).items():
        series = series.copy()
        series.index = series.index.astype(str)
        targets[name] = series
    if not difficulties:
        result.notes.append("no unlearning outcomes given: no correlation with outcomes")
    if targets:
        result.correlations = correlations(statistics, pd.DataFrame(targets), expectations=expect,
                                           alpha=alpha, columns=columns)
    return result
