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
from cud.difficulty.ladder import ForecastInputs, Prices
from cud.difficulty.study import StudyResult, StudySettings, run_study
from cud.difficulty.variants import CircuitData
from cud.errors import ConfigError, DataError
from cud.folders import folder_locks
from cud.prices import read_prices
from cud.progress import Progress
from cud.tables import save_table


def sample_info(cs: CircuitSet) -> pd.DataFrame:
    """What the study reads of a circuits folder's per-sample table: the answer length, the
    question length (the prompt's tokens: question and chat template), the question type where
    the data gave one, the faithfulness of each circuit size."""
    table = cs.table.set_index("id")
    keep = [c for c in table.columns if c in ("n_answer_tokens", "question_type")
            or c.startswith("faithfulness_")]
    info = table[keep].copy()
    if {"n_tokens", "n_answer_tokens"} <= set(table.columns):  # the prompt: question + template
        info["question_length"] = (table["n_tokens"] - table["n_answer_tokens"]).astype(float)
    if "question_type" in info and not (info["question_type"].astype(str) != "").any():
        info = info.drop(columns="question_type")
    return info


def circuit_data(cs: CircuitSet, ids, sizes=()) -> CircuitData:
    """A circuits folder's samples ``ids`` as the variants read them."""
    sub = cs.subset(ids)
    return CircuitData.build(sub.ids, sub.graph, sub.edge_scores, selection_of(sub.settings),
                             sub.circuits, sizes)


def validate_to_folder(circuits: CircuitSet, outcomes: Mapping[str, pd.DataFrame],
                       out: str | Path, settings: StudySettings = StudySettings(), *,
                       baselines: pd.DataFrame | None = None, anchors: AnchorSet | None = None,
                       anchors_out: str | Path | None = None,
                       scores_out: str | Path | None = None,
                       retest: CircuitSet | None = None,
                       others: Mapping[str, CircuitSet] | None = None,
                       forecast: ForecastInputs | None = None,
                       progress: Progress | None = None) -> StudyResult:
    """Run the held-out study on ``circuits`` against ``outcomes`` (``{method: table}``) and
    write it to ``out``; the main anchors' circuits to ``anchors_out`` and every sample's CUD to
    ``scores_out`` (default: ``out/anchors`` and ``out/scores``). ``anchors``: the main anchor
    set (default: a vote of the methods on the first pool). ``retest``: circuits of the same
    samples from other corrupted prompts (the test-retest table); ``others``: other circuits of
    the same samples (``{name: folder}``: variants ``cud_<name>``); ``forecast``: the ladder's
    pilots, prices and method flags (:func:`forecast_inputs`; default: the circuits' price
    only)."""
    out = Path(out)
    anchors_out = Path(anchors_out) if anchors_out is not None else out / "anchors"
    scores_out = Path(scores_out) if scores_out is not None else out / "scores"
    with folder_locks(out, anchors_out, scores_out):
        return _validate_to_folder(circuits, outcomes, out, settings, baselines, anchors,
                                   anchors_out, scores_out, retest, others, forecast, progress)


def _validate_to_folder(cs, outcomes, out, settings, baselines, anchors, anchors_out,
                        scores_out, retest, others, forecast, progress) -> StudyResult:
    selection = selection_of(cs.settings)
    sizes = tuple(sorted(set(settings.variant_sizes) | set(settings.sizes)))
    for name, other in {"retest": retest, **dict(others or {})}.items():
        if other is not None:
            check_compatible_circuits(cs, other, name)
    study = run_study(cs.ids, cs.edge_scores, cs.graph, selection, outcomes,
                      baselines=baselines, anchors=anchors, circuits=cs.circuits,
                      settings=settings, circuit_settings=cs.settings, info=sample_info(cs),
                      others={n: circuit_data(o, cs.ids) for n, o in (others or {}).items()},
                      retest=circuit_data(retest, cs.ids, sizes) if retest is not None
                      else None, forecast=forecast or forecast_inputs(circuits=cs.root),
                      progress=progress)
    study.save(out)
    main = anchor_circuits(study.anchors["main"], cs.ids, cs.edge_scores, cs.graph, selection,
                           circuit_settings=cs.settings)
    main.save(anchors_out)
    scores = score_samples(cs.ids, cs.edge_scores, main, distance_name=settings.distance,
                           weighted=settings.weighted, circuits=cs.circuits,
                           selection=selection)
    save_table(scores, scores_out / "scores", index=False)
    return study


def check_compatible_circuits(cs: CircuitSet, other: CircuitSet, name: str) -> None:
    """``other`` must hold circuits of every sample of ``cs``, on the same graph and model."""
    if other.graph.cfg != cs.graph.cfg:
        raise ConfigError(f"the {name} circuits ({other.root}) are of another graph")
    if other.settings.get("model_fingerprint") != cs.settings.get("model_fingerprint"):
        raise ConfigError(f"the {name} circuits ({other.root}) were computed on another model")
    missing = sorted(set(cs.ids) - set(other.ids))
    if missing:
        raise ConfigError(f"the {name} circuits ({other.root}) lack {len(missing)} of the "
                          f"samples (e.g. {missing[0]})")


def forecast_inputs(*, circuits: str | Path | None = None, baselines: str | Path | None = None,
                    unlearning: str | Path | None = None, pilots: str | Path | None = None
                    ) -> ForecastInputs:
    """The ladder's inputs read from the stage folders: the price of a circuit (``circuits``),
    of each baseline (``baselines``: its folder or table), of each method's full unlearning and
    evaluation and each method's flags (``unlearning``), and each method's pilot scores with
    their prices and steps (``pilots``). Any folder may be missing; its prices are then
    unknown (NaN in the ladder)."""
    estimates = {}
    if circuits is not None:
        circuit_prices = read_prices(circuits)
        if "circuits" in circuit_prices:
            estimates["circuits"] = circuit_prices["circuits"]
    estimates.update(read_prices(baselines))
    methods, flags = {}, {}
    if unlearning is not None:
        from cud.unlearning.folder import method_flags
        flags = method_flags(unlearning)
        cost = read_prices(unlearning)
        shared = cost.get("evaluation_before", 0.0)
        methods = {m: cost[m] + shared for m in flags if m in cost}
    prices = Prices(estimates=estimates, methods=methods)
    pilot_scores = {}
    if pilots is not None:
        from cud.difficulty.pilot import read_pilots
        run = read_pilots(pilots)
        pilot_scores = run.scores
        prices.pilots, prices.pilot_steps = run.prices, run.steps
        prices.total_steps = run.total_steps
    return ForecastInputs(pilots=pilot_scores, prices=prices, flags=flags)


def check_same_texts(cs: CircuitSet, unlearning: str | Path) -> None:
    """The circuits ``cs`` and the unlearning folder ``unlearning`` must be of the same texts:
    every sample id both hold has the same question and answer in both (the text hashes the
    unlearning folder records, :func:`cud.unlearning.folder.forget_text_hashes`). A folder
    written before the hashes were kept is not checked."""
    from cud.unlearning.folder import forget_text_hashes
    theirs = forget_text_hashes(unlearning)
    if not theirs or "text_hash" not in cs.table.columns:
        return
    ours = dict(zip(cs.table["id"].astype(str), cs.table["text_hash"]))
    differ = [i for i, h in ours.items() if i in theirs and theirs[i] != h]
    if differ:
        raise DataError(f"{len(differ)} of the samples have another question or answer than "
                        f"in the circuits {cs.root} (e.g. id {differ[0]!r}): the circuits and "
                        f"the outcomes are of different data; recompute one of them",
                        file=str(unlearning))
