"""The validation stage (`cud validate`, the validation stage of `cud run`): anchors from the
unlearning outcomes of a pool, CUD of every sample, and the held-out study of CUD beside every
baseline, written to folders:

    <validation>/   the study's tables and study.json (:meth:`StudyResult.save`)
    <anchors>/      the main anchor circuits, reusable by `cud score` on new samples
    <scores>/       scores.parquet/.csv: CUD, d_E, d_H and the anchor role of every sample
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from cud.circuits.store import CircuitSet
from cud.difficulty.anchors import AnchorSet, anchor_circuits, selection_of
from cud.difficulty.score import score_samples
from cud.difficulty.study import StudyResult, StudySettings, run_study
from cud.progress import Progress
from cud.tables import save_table


def validate_to_folder(circuits: CircuitSet, outcomes: Mapping[str, pd.DataFrame],
                       out: str | Path, settings: StudySettings = StudySettings(), *,
                       baselines: pd.DataFrame | None = None, anchors: AnchorSet | None = None,
                       anchors_out: str | Path | None = None,
                       scores_out: str | Path | None = None,
                       progress: Progress | None = None) -> StudyResult:
    """Run the held-out study on ``circuits`` against ``outcomes`` (``{method: table}``) and
    write it to ``out``; the main anchors' circuits to ``anchors_out`` and every sample's CUD to
    ``scores_out`` (default: ``out/anchors`` and ``out/scores``). ``anchors``: the main anchor
    set (default: a vote of the methods on the pool)."""
    cs = circuits
    selection = selection_of(cs.settings)
    study = run_study(cs.ids, cs.edge_scores, cs.graph, selection, outcomes,
                      baselines=baselines, anchors=anchors, circuits=cs.circuits,
                      settings=settings, circuit_settings=cs.settings, progress=progress)
    study.save(out)
    main = anchor_circuits(study.anchors["main"], cs.ids, cs.edge_scores, cs.graph, selection,
                           circuit_settings=cs.settings)
    main.save(anchors_out if anchors_out is not None else Path(out) / "anchors")
    scores = score_samples(cs.ids, cs.edge_scores, main, distance_name=settings.distance,
                           weighted=settings.weighted, circuits=cs.circuits,
                           selection=selection)
    save_table(scores, Path(scores_out if scores_out is not None else Path(out) / "scores")
               / "scores", index=False)
    return study
