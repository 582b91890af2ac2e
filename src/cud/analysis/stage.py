"""The analysis stage (`cud analyze`, the analysis stage of `cud run`): structure statistics of
every circuit, and whether easy and hard samples differ as the paper says (anchors against each
other, CUD-easy against CUD-hard groups, correlations with CUD and with the real outcomes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd

from cud.analysis.signature import StructureAnalysis, analyze_structure
from cud.circuits.store import CircuitSet
from cud.circuits.structure import structure_statistics
from cud.difficulty.groundtruth import difficulty
from cud.errors import ConfigError
from cud.folders import folder_lock


@dataclass(frozen=True)
class AnalysisSettings:
    """``outcomes``: the outcome definitions the statistics are correlated with, per method;
    ``fraction``: share of samples in each of the CUD-easy and CUD-hard groups; ``alpha``:
    significance level of the Holm-adjusted verdicts."""

    outcomes: tuple[str, ...] = ("nll_after", "nll_delta")
    fraction: float = 1 / 3
    alpha: float = 0.05

    def __post_init__(self):
        if not 0 < self.fraction <= 0.5:
            raise ConfigError(f"fraction must be in (0, 0.5], got {self.fraction}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")

    def to_dict(self) -> dict:
        return asdict(self)


def analyze_to_folder(circuits: CircuitSet, out: str | Path,
                      settings: AnalysisSettings = AnalysisSettings(), *,
                      anchors: Mapping[str, list[str]] | None = None,
                      cud: pd.Series | None = None,
                      outcomes: Mapping[str, pd.DataFrame] | None = None) -> StructureAnalysis:
    """Structure statistics of ``circuits`` and their comparisons, written to ``out``.
    ``anchors``: ``{"easy": ids, "hard": ids}``; ``cud``: CUD per id; ``outcomes``:
    ``{method: outcome table}`` (every outcome of ``settings.outcomes`` for every method)."""
    with folder_lock(out):  # one process at a time writes into ``out``
        return _analyze_to_folder(circuits, out, settings, anchors, cud, outcomes)


def _analyze_to_folder(cs, out, settings, anchors, cud, outcomes) -> StructureAnalysis:
    stats = structure_statistics(cs.graph, cs.circuits.numpy(), ids=cs.ids)
    difficulties = {f"{m} {o}": difficulty(t, o, source=m)
                    for o in settings.outcomes for m, t in (outcomes or {}).items()}
    result = analyze_structure(stats, anchors=anchors, cud=cud, difficulties=difficulties,
                               fraction=settings.fraction, alpha=settings.alpha)
    result.save(out)
    return result
