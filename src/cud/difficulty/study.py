"""The held-out study: CUD beside every baseline, judged on samples that were not anchors.

From per-sample edge scores, per-method outcome tables and baseline metrics,
:func:`run_study` builds

- the anchors: the main set (given, or a majority vote of all methods) and one set per method,
  all drawn from the same seeded pool, so every table shares one held-out set: every sample
  outside the union of the anchor sets' ``excluded`` ids;
- ``heldout``: CUD (main anchors), the circuit-feature predictor, each baseline and a random
  ranking against each method's outcome (two outcome definitions), with bootstrap intervals;
- ``cross_method``: CUD from method A's anchors judged on method B, beside ``agreement``, the
  methods' own agreement on the held-out samples (METHOD §9's reference line);
- ``robustness``: the same statistics across circuit sizes, the three distances, binary and
  weighted circuits, with each variant's rank agreement with the main CUD.

Every number comes through :func:`cud.difficulty.validation.held_out_pairs`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
from torch import Tensor

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings, select
from cud.difficulty.anchors import (AnchorCircuits, AnchorSet, anchor_circuits, anchor_pool,
                                    anchors_from_outcomes)
from cud.difficulty.groundtruth import (DEFAULT_ANCHOR_OUTCOME, DEFAULT_OUTCOMES, common_ids,
                                        consensus_difficulty, difficulty, indexed_by_id,
                                        seeded_random)
from cud.difficulty.predictor import circuit_features, fit_predictor
from cud.difficulty.score import DISTANCES, cud_scores
from cud.difficulty.validation import (agreement_matrix, excluded_set, held_out_pairs,
                                       orientation, spearman, validation_table)
from cud.errors import ConfigError
from cud.progress import Progress, within
from cud.tables import save_table

@dataclass(frozen=True)
class StudySettings:
    """How anchors are chosen and what is measured. Defaults follow the reference setup where it
    has one (k per method, majority vote, loss after unlearning, cosine distance)."""

    k: int = 5
    vote: str = "majority"
    anchor_outcome: str = DEFAULT_ANCHOR_OUTCOME
    pool_fraction: float = 0.5
    seed: int = 0
    outcomes: tuple[str, ...] = DEFAULT_OUTCOMES
    distance: str = "cosine"
    weighted: bool = False
    sizes: tuple[int, ...] = (50, 75, 100, 200)
    distances: tuple[str, ...] = DISTANCES
    n_boot: int = 1000
    ci: float = 0.95
    predictor: bool = True
    cross_method: bool = True

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ConfigError(f"unknown distance '{self.distance}' "
                              f"(choose from {', '.join(DISTANCES)})")
        bad = [d for d in self.distances if d not in DISTANCES]
        if bad:
            raise ConfigError(f"unknown distance(s) {', '.join(bad)}")
        if any(n < 1 for n in self.sizes):
            raise ConfigError("circuit sizes must be at least 1 edge")


@dataclass
class StudyResult:
    heldout: pd.DataFrame          # metric x method x outcome statistics (validation.COLUMNS)
    cross_method: pd.DataFrame     # anchors' method x judged method x outcome statistics
    agreement: dict[str, pd.DataFrame]   # outcome -> methods' own Spearman matrix (held-out)
    robustness: pd.DataFrame       # size x distance x weighted x method x outcome statistics
    metrics: pd.DataFrame          # every sample's difficulty metrics (anchors flagged)
    anchors: dict[str, AnchorSet]  # "main" and one per method
    held_out: list[str]            # the ids every statistic is computed on (at most)
    excluded: list[str]
    predictor: dict = field(default_factory=dict)
    settings: StudySettings = field(default_factory=StudySettings)

    def save(self, folder: str | Path) -> Path:
        """Write every table (Parquet + CSV) and ``study.json`` (settings, anchor sets, the
        held-out and excluded ids, the predictor) into ``folder``."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        save_table(self.heldout, root / "heldout", index=False)
        if not self.cross_method.empty:
            save_table(self.cross_method, root / "cross_method", index=False)
        save_table(self.robustness, root / "robustness", index=False)
        save_table(self.metrics, root / "metrics", index=True)
        for name, matrix in self.agreement.items():
            matrix.to_csv(root / f"agreement_{name}.csv")
        (root / "study.json").write_text(json.dumps({
            "settings": asdict(self.settings),
            "anchors": {n: a.to_dict() for n, a in self.anchors.items()},
            "held_out": self.held_out, "excluded": self.excluded,
            "predictor": self.predictor}, indent=1, default=str) + "\n")
        return root


def _cud(edge_scores: Tensor, ac: AnchorCircuits, ids: Sequence[str], circuits: Tensor,
         distance: str, weighted: bool) -> pd.Series:
    """CUD of every sample; ``circuits`` must be selected like ``ac``'s anchor circuits."""
    cud, _, _ = cud_scores(edge_scores, ac, distance_name=distance, weighted=weighted,
                           circuits=circuits)
    return pd.Series(cud.numpy(), index=pd.Index(list(ids), name="id"))


def run_study(ids: Sequence[str], edge_scores: Tensor, graph: Graph,
              selection: SelectionSettings, outcomes: Mapping[str, pd.DataFrame], *,
              baselines: pd.DataFrame | None = None, anchors: AnchorSet | None = None,
              circuits: Tensor | None = None, settings: StudySettings = StudySettings(),
              circuit_settings: dict | None = None, progress: Progress | None = None
              ) -> StudyResult:
    """Run the held-out study (see the module docstring). ``ids``/``edge_scores`` (N, E): every
    sample with a circuit; ``circuits``: their (N, E) circuits under ``selection`` (selected
    here when missing); ``outcomes``: ``{method: outcome table}``; ``baselines``: index id, one
    column per baseline metric; ``anchors``: the main anchor set (default: a majority vote of
    all methods)."""
    ids = [str(i) for i in ids]
    if not outcomes:
        raise ConfigError("the study needs at least one method's outcomes")
    s = settings
    def report(name: str, done: int, total: int) -> None:
        within(progress, "validation")(done, total, name)
    if circuits is None:
        circuits = select(graph, edge_scores, selection)
    with_circuit = set(ids)
    outcomes = {m: indexed_by_id(t) for m, t in outcomes.items()}
    outcomes = {m: t.loc[[i for i in t.index if i in with_circuit]] for m, t in outcomes.items()}
    shared = common_ids(outcomes)
    if not shared:
        raise ConfigError("no sample has both a circuit and an outcome of every method")
    pool = anchor_pool(shared, s.pool_fraction, s.seed)

    # anchors: the main set and one per method, from the same pool
    sets: dict[str, AnchorSet] = {}
    sets["main"] = anchors or anchors_from_outcomes(
        outcomes, s.k, outcome=s.anchor_outcome, vote=s.vote, pool=pool, seed=s.seed,
        name=f"{s.vote}:{'+'.join(outcomes)}" if len(outcomes) > 1 else None)
    if s.cross_method:
        for m in outcomes:
            sets[m] = anchors_from_outcomes({m: outcomes[m]}, s.k, outcome=s.anchor_outcome,
                                            pool=pool, seed=s.seed, name=m)
    banned = excluded_set(x for a in sets.values() for x in a.excluded)
    held = [i for i in shared if i not in banned]
    circ = {name: anchor_circuits(a, ids, edge_scores, graph, selection,
                                  circuit_settings=circuit_settings)
            for name, a in sets.items()}
    main = circ["main"]

    truths = {(m, o): difficulty(t, o, source=m) for o in s.outcomes for m, t in outcomes.items()}

    # difficulty metrics of every sample
    metrics = pd.DataFrame(index=pd.Index(ids, name="id"))
    metrics["cud"] = _cud(edge_scores, main, ids, circuits, s.distance, s.weighted)
    predictor_info = {}
    if s.predictor:
        report("predictor", 0, 1)
        feats = circuit_features(ids, edge_scores, main, circuits=circuits)
        target = consensus_difficulty(outcomes, s.anchor_outcome) if len(outcomes) > 1 \
            else difficulty(next(iter(outcomes.values())), s.anchor_outcome)
        train = [i for i in shared if i in banned]
        fit = fit_predictor(feats, target, train=train, anchors=sets["main"].easy
                            + sets["main"].hard)
        metrics["predictor"] = fit.predictions.reindex(metrics.index)
        predictor_info = {"train_ids": fit.train_ids, "alpha": fit.alpha,
                          "coefficients": fit.coefficients.to_dict(), "target": target.name}
        report("predictor", 1, 1)
    if baselines is not None:
        base = baselines.copy()
        if "id" in base.columns:
            base = base.set_index("id")
        base.index = base.index.astype(str)
        for col in base.columns:
            if pd.api.types.is_numeric_dtype(base[col]) and col not in metrics:
                metrics[col] = base[col].reindex(metrics.index).astype(float)
    if "random" not in metrics:
        metrics["random"] = seeded_random(ids, s.seed)
    directions = orientation(metrics, sets["main"].easy, sets["main"].hard)

    report("held-out table", 0, 1)
    heldout = validation_table(metrics, truths, excluded=banned, directions=directions,
                               n_boot=s.n_boot, ci=s.ci, seed=s.seed)
    report("held-out table", 1, 1)

    # cross-method: CUD from each method's anchors judged on every method
    cross_rows = []
    agreement = {}
    if s.cross_method:
        for k, m in enumerate(outcomes):
            report("cross-method", k, len(outcomes))
            col = pd.DataFrame({"cud": _cud(edge_scores, circ[m], ids, circuits, s.distance,
                                            s.weighted)})
            table = validation_table(col, truths, excluded=banned, n_boot=s.n_boot, ci=s.ci,
                                     seed=s.seed)
            table.insert(0, "anchors_from", m)
            cross_rows.append(table)
        for o in s.outcomes:
            agreement[o] = agreement_matrix({m: truths[(m, o)] for m in outcomes},
                                            excluded=banned)
    cross = pd.concat(cross_rows, ignore_index=True) if cross_rows else pd.DataFrame()

    # robustness: circuit size x distance x binary/weighted, main anchors
    rob_rows = []
    variants = [(n, d, w) for n in (s.sizes or (selection.n_edges,)) for d in s.distances
                for w in (False, True)]
    by_size: dict[int, Tensor] = {}   # the samples' circuits at each size, selected once
    anchors_by_size: dict[int, AnchorCircuits] = {}
    for k, (n, d, w) in enumerate(variants):
        report("robustness", k, len(variants))
        sel = replace(selection, selection="greedy" if selection.selection == "threshold"
                      else selection.selection, n_edges=n)
        if n not in by_size:
            by_size[n] = circuits if sel == selection else select(graph, edge_scores, sel)
            anchors_by_size[n] = main if sel == main.selection else main.with_selection(sel)
        values = _cud(edge_scores, anchors_by_size[n], ids, by_size[n], d, w)
        table = validation_table(pd.DataFrame({"cud": values}), truths, excluded=banned,
                                 n_boot=s.n_boot, ci=s.ci, seed=s.seed)
        pairs = held_out_pairs(values, metrics["cud"], excluded=banned)
        table.insert(0, "n_edges", n)
        table.insert(1, "distance", d)
        table.insert(2, "weighted", w)
        table["rho_vs_main"] = spearman(pairs.metric, pairs.truth)[0]
        rob_rows.append(table)
    report("robustness", len(variants), len(variants))
    robustness = pd.concat(rob_rows, ignore_index=True) if rob_rows else pd.DataFrame()

    metrics.insert(0, "anchor_role", [sets["main"].role(i) for i in ids])
    metrics.insert(1, "held_out", [i in set(held) for i in ids])
    return StudyResult(heldout=heldout, cross_method=cross, agreement=agreement,
                       robustness=robustness, metrics=metrics, anchors=sets, held_out=held,
                       excluded=sorted(banned), predictor=predictor_info, settings=s)


def read_study(folder: str | Path) -> StudyResult:
    """A validation folder written by :meth:`StudyResult.save`, read back."""
    from cud.errors import DataError
    root = Path(folder)
    meta_path = root / "study.json"
    if not meta_path.is_file():
        raise DataError("not a validation folder (no study.json); run `cud validate` first",
                        file=str(root))
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"unreadable ({e.msg})", file=str(meta_path), line=e.lineno) from None

    def table(name: str) -> pd.DataFrame:
        path = root / f"{name}.parquet"
        return pd.read_parquet(path) if path.is_file() else pd.DataFrame()

    agreement = {p.stem[len("agreement_"):]: pd.read_csv(p, index_col=0)
                 for p in sorted(root.glob("agreement_*.csv"))}
    known = {f.name for f in fields(StudySettings)}
    settings = StudySettings(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in meta.get("settings", {}).items() if k in known})
    return StudyResult(heldout=table("heldout"), cross_method=table("cross_method"),
                       agreement=agreement, robustness=table("robustness"),
                       metrics=table("metrics"),
                       anchors={n: AnchorSet.from_dict(a) for n, a in meta["anchors"].items()},
                       held_out=meta["held_out"], excluded=meta["excluded"],
                       predictor=meta.get("predictor", {}), settings=settings)
