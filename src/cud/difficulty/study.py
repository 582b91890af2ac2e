"""The held-out study: CUD beside every baseline and every variant, judged on samples that were
not anchors, over repeated random anchor pools.

A figure from one random split is an anecdote, so the study draws ``pools`` anchor pools (seeds
``seed``, ``seed + 1``, ...). For each pool, :func:`run_study`

- chooses the anchors: the main set (a vote of all methods, or the user's) and one set per
  method, all from that pool; every sample of the pool is held back (its outcome was read);
- scores every sample with the paper's CUD, its variants (:mod:`cud.difficulty.variants`), the
  circuit-feature predictor, the predictor that adds the loss-type baselines (``combined``),
  every baseline and simple confounders (the question type's mean difficulty, the answer
  length); the baselines' directions are read from the pool's anchors;
- chooses one variant on the pool's *validation part* (pool samples that are not anchors) and
  reports it on the held-out samples as ``selected``; no held-out id is read by that choice;
- computes Spearman ρ (the headline), Kendall τ-b and quartile AUROC of every metric against
  every method's outcome (``nll_after`` and ``nll_delta``) on the held-out samples, with
  bootstrap replicates drawn once per pool and shared by all metrics.

Across pools the tables give the mean, the spread over pools and a pooled interval (the
percentiles of all pools' replicates together); ``random`` is a permutation null; ``paired``
tests CUD (and the selected variant, and the predictors) against the best baseline on the same
resamples; ``cross_method`` and ``agreement`` put each method's anchors against each method
beside the methods' own agreement (METHOD §9); ``robustness`` spans circuit sizes, distances and
weighting; ``confounds`` asks whether CUD is only a question template or an answer length; and
``retest`` (with a second circuits folder) is the score's test-retest reliability.

Every statistic's data come through :func:`cud.difficulty.validation.held_out_pairs` or the
held-out ids of its pool.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from torch import Tensor

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings
from cud.difficulty.anchors import (AnchorSet, anchor_circuits, anchor_pool,
                                    anchors_from_outcomes)
from cud.difficulty.forecast import is_cud, one_hot_types
from cud.difficulty.groundtruth import (DEFAULT_ANCHOR_OUTCOME, DEFAULT_OUTCOMES, common_ids,
                                        consensus_difficulty, difficulty, indexed_by_id)
from cud.difficulty.ladder import ForecastInputs, PoolView, ladder_table
from cud.difficulty.predictor import circuit_features, fit_predictor, structure_features
from cud.difficulty.retest import retest_table
from cud.difficulty.score import DISTANCES
from cud.difficulty.validation import (bootstrap_draws, excluded_set, extreme_quartiles,
                                       held_out_pairs, orientation, paired_difference,
                                       partial_spearman, permutation_null, pooled_interval,
                                       replicates, stratified_spearman)
from cud.difficulty.variants import CircuitData, cud_at, variant_scores
from cud.errors import ConfigError
from cud.limits import check_seed
from cud.progress import Progress, within
from cud.statistics import spearman
from cud.tables import save_table

def _mean(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


def _sd(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else math.nan


#: metrics that are not baselines (never "the best baseline")
OURS_PREFIXES = ("cud", "selected", "predictor", "combined")
#: the baselines the combined predictor adds to the circuit features
LOSS_TYPE = ("loss", "prob", "exact_mem", "min_k_prob", "grad_norm", "mrd")


@dataclass(frozen=True)
class StudySettings:
    """How anchors are chosen and what is measured (`cud validate`, ``[study]`` of `cud run`).
    Defaults follow the reference setup where it has one (k per method, majority vote, loss
    after unlearning, cosine distance).

    ``pools``: anchor pools drawn (seeds ``seed`` ...); ``pool_fraction``: each pool's share of
    the samples; ``n_boot`` bootstrap resamples and ``n_perm`` permutations per pool;
    ``sizes`` x ``distances`` x binary/weighted: the robustness table; ``variants``: also score
    the variants of :mod:`cud.difficulty.variants` (circuits of ``variant_sizes`` edges, node
    circuits of ``node_k`` nodes, the ``knn`` nearest anchors, the smallest size whose median
    faithfulness reaches ``faithfulness_target``) and choose one on each pool's validation part.
    """

    k: int = 5
    vote: str = "majority"
    anchor_outcome: str = DEFAULT_ANCHOR_OUTCOME
    pool_fraction: float = 0.5
    pools: int = 10
    seed: int = 0
    outcomes: tuple[str, ...] = DEFAULT_OUTCOMES
    distance: str = "cosine"
    weighted: bool = False
    sizes: tuple[int, ...] = (50, 75, 100, 200)
    distances: tuple[str, ...] = DISTANCES
    n_boot: int = 1000
    n_perm: int = 1000
    ci: float = 0.95
    predictor: bool = True
    cross_method: bool = True
    variants: bool = True
    variant_sizes: tuple[int, ...] = (75, 300, 1000, 3000)
    node_k: int = 30
    knn: int = 3
    faithfulness_target: float = 0.5
    #: also run METHOD §8's easy/hard split protocol with this unlearning method
    #: (:func:`cud.difficulty.split.split_protocol_to_folder`); None: not run
    split_method: str | None = None
    #: the forecast ladder (:mod:`cud.difficulty.ladder`): every estimate at its price per
    #: method, with learned forecasters fitted on each pool (``ladder.csv``)
    ladder: bool = True

    def __post_init__(self):
        check_seed(self.seed)
        if self.split_method is not None:
            from cud.unlearning.methods import METHODS
            if self.split_method not in METHODS:
                raise ConfigError(f"unknown split_method '{self.split_method}' "
                                  f"(choose from {', '.join(METHODS)})")
        if self.distance not in DISTANCES:
            raise ConfigError(f"unknown distance '{self.distance}' "
                              f"(choose from {', '.join(DISTANCES)})")
        bad = [d for d in self.distances if d not in DISTANCES]
        if bad:
            raise ConfigError(f"unknown distance(s) {', '.join(bad)}")
        if any(n < 1 for n in self.sizes + self.variant_sizes):
            raise ConfigError("circuit sizes must be at least 1 edge")
        if self.pools < 1:
            raise ConfigError(f"pools must be at least 1, got {self.pools}")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.n_boot < 0 or self.n_perm < 0:
            raise ConfigError("n_boot and n_perm must be >= 0")
        if not 0 < self.ci < 1:
            raise ConfigError(f"ci must be in (0, 1), got {self.ci}")


@dataclass
class StudyResult:
    heldout: pd.DataFrame          # metric x method x outcome, pooled over the anchor pools
    cross_method: pd.DataFrame     # anchors' method x judged method x outcome (mean over pools)
    agreement: dict[str, pd.DataFrame]   # outcome -> methods' own Spearman matrix (held-out)
    robustness: pd.DataFrame       # size x distance x weighted x method x outcome
    metrics: pd.DataFrame          # every sample's metrics in the first pool (roles flagged)
    anchors: dict[str, AnchorSet]  # the first pool's "main" and per-method anchor sets
    held_out: list[str]            # the first pool's held-out ids
    excluded: list[str]            # the first pool's excluded ids
    predictor: dict = field(default_factory=dict)
    settings: StudySettings = field(default_factory=StudySettings)
    per_pool: pd.DataFrame = field(default_factory=pd.DataFrame)   # pool x metric x truth
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)     # ours vs the best baseline
    variants: pd.DataFrame = field(default_factory=pd.DataFrame)   # validation-part scores
    confounds: pd.DataFrame = field(default_factory=pd.DataFrame)
    retest: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_sample: pd.DataFrame = field(default_factory=pd.DataFrame)  # pool, id, role, metrics
    pools: list[dict] = field(default_factory=list)                 # seed, anchors, held-out
    ladder: pd.DataFrame = field(default_factory=pd.DataFrame)      # every estimate's price, ρ
    forecasters: dict = field(default_factory=dict)                 # first pool's fits
    flags: dict = field(default_factory=dict)          # method -> collapsed, retain NLL rise

    TABLES = ("heldout", "per_pool", "paired", "variants", "cross_method", "robustness",
              "confounds", "retest", "ladder")

    def save(self, folder: str | Path) -> Path:
        """Write every table (Parquet + CSV), the per-sample values (``per_sample``) and
        ``study.json`` (settings, every pool's anchor sets and held-out ids, the predictor)."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        for name in self.TABLES:
            table = getattr(self, name)
            if not table.empty:
                save_table(table, root / name, index=False)
        save_table(self.metrics, root / "metrics", index=True)
        if not self.per_sample.empty:
            save_table(self.per_sample, root / "per_sample", index=False)
        for name, matrix in self.agreement.items():
            matrix.to_csv(root / f"agreement_{name}.csv")
        (root / "study.json").write_text(json.dumps({
            "settings": asdict(self.settings),
            "anchors": {n: a.to_dict() for n, a in self.anchors.items()},
            "held_out": self.held_out, "excluded": self.excluded, "pools": self.pools,
            "predictor": self.predictor, "forecasters": self.forecasters,
            "flags": self.flags}, indent=1, default=str) + "\n")
        return root


# --- inputs ---------------------------------------------------------------------------------

def _truths(outcomes: Mapping[str, pd.DataFrame], names: Sequence[str]
            ) -> dict[tuple[str, str], pd.Series]:
    return {(m, o): difficulty(t, o, source=m) for o in names for m, t in outcomes.items()}


def _faithfulness_table(info: pd.DataFrame | None) -> pd.DataFrame:
    """The ``faithfulness_<n>`` columns of the circuits table as one column per size (int)."""
    if info is None:
        return pd.DataFrame()
    cols = {int(c.rsplit("_", 1)[1]): c for c in info.columns
            if c.startswith("faithfulness_") and c.rsplit("_", 1)[1].isdigit()}
    return info[[cols[n] for n in sorted(cols)]].set_axis(sorted(cols), axis=1) if cols \
        else pd.DataFrame()


# --- one pool -------------------------------------------------------------------------------

@dataclass
class _Pool:
    seed: int
    pool: list[str]
    anchors: dict[str, AnchorSet]
    banned: frozenset
    held: list[str]
    metrics: pd.DataFrame = None
    directions: pd.Series = None
    selected: str = ""
    info: dict = field(default_factory=dict)


def _draw_pools(shared: list[str], outcomes, s: StudySettings, user: AnchorSet | None
                ) -> list[_Pool]:
    pools = []
    for p in range(1 if user is not None else s.pools):
        seed = s.seed + p
        pool = anchor_pool(shared, s.pool_fraction, seed)
        sets: dict[str, AnchorSet] = {}
        sets["main"] = user or anchors_from_outcomes(
            outcomes, s.k, outcome=s.anchor_outcome, vote=s.vote, pool=pool, seed=seed,
            name=f"{s.vote}:{'+'.join(outcomes)}" if len(outcomes) > 1 else None)
        if s.cross_method:
            for m in outcomes:
                sets[m] = anchors_from_outcomes({m: outcomes[m]}, s.k, outcome=s.anchor_outcome,
                                                pool=pool, seed=seed, name=m)
        banned = excluded_set(x for a in sets.values() for x in a.excluded)
        pools.append(_Pool(seed, pool, sets, banned, [i for i in shared if i not in banned]))
    return pools


def _type_means(info: pd.DataFrame | None, target: pd.Series, train: list[str]) -> pd.Series:
    """Each sample's question type's mean difficulty over the ``train`` samples (the pool):
    what a question template alone predicts."""
    if info is None or "question_type" not in info:
        return pd.Series(dtype=float)
    types = info["question_type"].astype(str)
    known = [i for i in train if i in target.index and i in types.index]
    means = target.reindex(known).groupby(types.reindex(known)).mean()
    return types.map(means).astype(float).fillna(float(target.reindex(known).mean()))


def _score_pool(p: _Pool, data: CircuitData, outcomes, baselines, info, structure,
                s: StudySettings) -> None:
    """Every metric of every sample for pool ``p`` (into ``p.metrics``) and its directions."""
    ids = data.ids
    main = p.anchors["main"]
    metrics = pd.DataFrame(index=pd.Index(ids, name="id"))
    if s.variants:
        scores, p.info = variant_scores(data, main, p.pool, sizes=s.variant_sizes,
                                        node_k=s.node_k, knn=s.knn,
                                        faithfulness_target=s.faithfulness_target)
        for name, values in scores.items():
            metrics[name] = values
    size = data.size
    metrics["cud"] = cud_at(data, main, size, s.distance, s.weighted)
    target = consensus_difficulty(outcomes, s.anchor_outcome) if len(outcomes) > 1 \
        else difficulty(next(iter(outcomes.values())), s.anchor_outcome)
    train = [i for i in p.pool if i in p.banned]
    base = None
    if baselines is not None:
        base = baselines.copy()
        if "id" in base.columns:
            base = base.set_index("id")
        base.index = base.index.astype(str)
        for col in base.columns:
            if pd.api.types.is_numeric_dtype(base[col]) and col not in metrics and col != "random":
                metrics[col] = base[col].reindex(metrics.index).astype(float)
    if info is not None and "n_answer_tokens" in info:
        metrics["answer_length"] = info["n_answer_tokens"].reindex(metrics.index).astype(float)
    types = _type_means(info, target, train)
    if len(types):
        metrics["question_type"] = types.reindex(metrics.index)
    if s.predictor:
        ac = anchor_circuits(main, ids, data.edge_scores, data.graph, data.selection)
        feats = circuit_features(ids, data.edge_scores, ac, circuits=data.circuits[size],
                                 structure=structure)
        anchor_ids = main.easy + main.hard
        fit = fit_predictor(feats, target, train=train, anchors=anchor_ids)
        metrics["predictor"] = fit.predictions.reindex(metrics.index)
        p.info["predictor"] = {"alpha": fit.alpha, "train_ids": fit.train_ids,
                               "coefficients": fit.coefficients.to_dict()}
        loss_type = [c for c in LOSS_TYPE if c in metrics]
        if loss_type:
            both = pd.concat([feats, metrics[loss_type].add_prefix("b_")], axis=1)
            fit = fit_predictor(both, target, train=train, anchors=anchor_ids)
            metrics["combined"] = fit.predictions.reindex(metrics.index)
    p.directions = orientation(metrics, main.easy, main.hard)
    p.metrics = metrics
    _select_variant(p, outcomes, s)


def _select_variant(p: _Pool, outcomes, s: StudySettings) -> None:
    """The variant with the highest mean Spearman ρ against every method's outcome on the
    pool's validation part (pool samples that are not anchors): held-out ids are never read."""
    anchors = set(p.anchors["main"].easy) | set(p.anchors["main"].hard)
    validation = [i for i in p.pool if i not in anchors]
    candidates = [c for c in p.metrics.columns if c.startswith(OURS_PREFIXES)]
    truths = _truths(outcomes, s.outcomes)
    rows = []
    for name in candidates:
        sign = int(p.directions.get(name, 1))
        rhos = []
        for truth in truths.values():
            x = sign * p.metrics[name].reindex(validation).to_numpy(dtype=float)
            y = truth.reindex(validation).to_numpy(dtype=float)
            rhos.append(spearman(x, y)[0])
        score = _mean(rhos)
        rows.append((name, score if np.isfinite(score) else -np.inf))
    rows.sort(key=lambda r: -r[1])
    p.selected = rows[0][0] if rows else "cud"
    p.info["validation"] = {name: score for name, score in rows}
    p.info["validation_n"] = len(validation)
    p.metrics["selected"] = p.metrics[p.selected]
    p.directions["selected"] = p.directions.get(p.selected, 1)


# --- statistics over pools ------------------------------------------------------------------

def _pool_statistics(p: _Pool, truths, s: StudySettings, q: float = 0.25):
    """{(metric, method, outcome): Replicates} and {(method, outcome): null ρ} of one pool.
    Every metric with a value for every held-out sample is resampled with the same indices
    (``Replicates.shared``), so that differences between metrics are paired."""
    out, nulls = {}, {}
    for t, ((method, outcome), truth) in enumerate(truths.items()):
        rng_seed = 1_000 * p.seed + t
        # sorted, as held_out_pairs returns its pairs
        ids = sorted(i for i in p.held if i in truth.index and np.isfinite(truth[i]))
        y = truth.reindex(ids).to_numpy(dtype=float)
        enough = len(ids) >= 3
        draws = bootstrap_draws(len(ids), s.n_boot if enough else 0, rng_seed)
        idx, _ = extreme_quartiles(y, q)
        qdraws = np.random.default_rng(rng_seed + 500_000).integers(
            0, len(idx), size=(s.n_boot, len(idx))) if len(idx) >= 2 else None
        nulls[(method, outcome)] = permutation_null(y, s.n_perm, rng_seed) \
            if enough and s.n_perm else np.array([])
        for metric in p.metrics.columns:
            sign = int(p.directions.get(metric, 1))
            pairs = held_out_pairs(sign * p.metrics[metric].astype(float), truth,
                                   excluded=p.banned)
            if pairs.ids == tuple(ids):
                rep = replicates(pairs.metric, pairs.truth, draws, q, qdraws)
                rep.shared = True
            else:  # values missing for some samples: resampled on their own, never paired
                own = bootstrap_draws(len(pairs), s.n_boot if len(pairs) >= 3 else 0,
                                      rng_seed + 1)
                rep = replicates(pairs.metric, pairs.truth, own, q)
                rep.shared = False
            out[(metric, method, outcome)] = rep
    return out, nulls


def _pooled(reps: list, ci: float) -> dict:
    rho = np.array([r.spearman for r in reps], dtype=float)
    tau = np.array([r.kendall for r in reps], dtype=float)
    auc = np.array([r.auroc for r in reps], dtype=float)
    lo, hi = pooled_interval([r.boot_spearman for r in reps], ci)
    alo, ahi = pooled_interval([r.boot_auroc for r in reps], ci)

    return {"n": int(round(np.mean([r.n for r in reps]))), "pools": len(reps),
            "spearman": _mean(rho), "spearman_sd": _sd(rho), "spearman_lo": lo,
            "spearman_hi": hi, "kendall": _mean(tau), "kendall_sd": _sd(tau),
            "auroc": _mean(auc), "auroc_sd": _sd(auc), "auroc_lo": alo, "auroc_hi": ahi}


COLUMNS = ["metric", "method", "outcome", "direction", "n", "pools", "spearman", "spearman_sd",
           "spearman_lo", "spearman_hi", "spearman_p", "kendall", "kendall_sd", "auroc",
           "auroc_sd", "auroc_lo", "auroc_hi"]


def _heldout_tables(pools: list[_Pool], all_stats, all_nulls, truths, s: StudySettings):
    metrics = list(dict.fromkeys(m for p in pools for m in p.metrics.columns))
    rows, per_pool = [], []
    for (method, outcome) in truths:
        null = np.concatenate([n[(method, outcome)] for n in all_nulls]) if all_nulls else \
            np.array([])
        null = null[np.isfinite(null)]
        for metric in metrics:
            present = [(p, st[(metric, method, outcome)]) for p, st in zip(pools, all_stats)
                       if (metric, method, outcome) in st]
            if not present:
                continue
            reps = [rep for _, rep in present]
            row = {"metric": metric, "method": method, "outcome": outcome,
                   "direction": int(pools[0].directions.get(metric, 1)), **_pooled(reps, s.ci)}
            # the pooled permutation null of the pools' held-out samples; conservative for a
            # mean over several pools, whose spread is smaller than one pool's
            row["spearman_p"] = float((np.abs(null) >= abs(row["spearman"])).mean()) \
                if len(null) and np.isfinite(row["spearman"]) else math.nan
            rows.append(row)
            for p, rep in present:
                per_pool.append({"pool": p.seed, "metric": metric, "method": method,
                                 "outcome": outcome, "direction": int(p.directions.get(metric, 1)),
                                 "n": rep.n, "spearman": rep.spearman, "kendall": rep.kendall,
                                 "auroc": rep.auroc})
        if len(null):  # the random ranking: the permutation null itself
            a = (1 - s.ci) / 2
            rows.append({"metric": "random", "method": method, "outcome": outcome,
                         "direction": 1, "n": int(round(np.mean([len(p.held) for p in pools]))),
                         "pools": len(pools), "spearman": float(null.mean()),
                         "spearman_sd": float(null.std(ddof=1)),
                         "spearman_lo": float(np.quantile(null, a)),
                         "spearman_hi": float(np.quantile(null, 1 - a)), "spearman_p": 1.0,
                         "kendall": math.nan, "kendall_sd": math.nan, "auroc": 0.5,
                         "auroc_sd": math.nan, "auroc_lo": math.nan, "auroc_hi": math.nan})
    return pd.DataFrame(rows, columns=COLUMNS), pd.DataFrame(per_pool)


def _is_baseline(metric: str) -> bool:
    return not metric.startswith(OURS_PREFIXES) and metric != "random"


def _paired_table(heldout: pd.DataFrame, all_stats, pools, truths, s: StudySettings
                  ) -> pd.DataFrame:
    """Ours (CUD, the selected variant, the predictors) against the best baseline of each
    method and outcome (the highest mean ρ on the held-out samples: the choice favours the
    baseline), on the same resamples of every pool."""
    rows = []
    for (method, outcome) in truths:
        h = heldout[(heldout["method"] == method) & (heldout["outcome"] == outcome)]
        bases = h[h["metric"].map(_is_baseline)].dropna(subset=["spearman"])
        if bases.empty:
            continue
        best = bases.sort_values("spearman", ascending=False)["metric"].iloc[0]
        for metric in ("cud", "selected", "combined", "predictor"):
            key, other = (metric, method, outcome), (best, method, outcome)
            if not all(key in st and st[key].shared and st[other].shared for st in all_stats):
                continue
            a = np.concatenate([st[key].boot_spearman for st in all_stats])
            b = np.concatenate([st[other].boot_spearman for st in all_stats])
            test = paired_difference(a, b, s.ci)
            wins = np.mean([st[key].spearman > st[other].spearman for st in all_stats])
            rows.append({"metric": metric, "versus": best, "method": method,
                         "outcome": outcome, **test, "pools_won": float(wins),
                         "pools": len(pools)})
    return pd.DataFrame(rows)


def _cross_method(pools, data: CircuitData, outcomes, truths, s: StudySettings):
    """CUD from each method's anchors against each method's difficulty (mean ρ over pools),
    and the methods' own agreement on the held-out samples (mean over pools)."""
    rows, agreement = [], {}
    if not s.cross_method:
        return pd.DataFrame(), agreement
    for m in outcomes:
        for (method, outcome), truth in truths.items():
            values = []
            for p in pools:
                cud = cud_at(data, p.anchors[m], data.size, s.distance, s.weighted)
                pairs = held_out_pairs(cud, truth, excluded=p.banned)
                values.append((spearman(pairs.metric, pairs.truth)[0], len(pairs)))
            rho = [v[0] for v in values]
            rows.append({"anchors_from": m, "metric": "cud", "method": method,
                         "outcome": outcome, "n": int(np.mean([v[1] for v in values])),
                         "pools": len(pools), "spearman": _mean(rho), "spearman_sd": _sd(rho)})
    for o in s.outcomes:
        names = list(outcomes)
        mats = []
        for p in pools:
            mat = pd.DataFrame(np.nan, index=names, columns=names)
            for a in names:
                for b in names:
                    pairs = held_out_pairs(truths[(a, o)], truths[(b, o)], excluded=p.banned)
                    mat.loc[a, b] = spearman(pairs.metric, pairs.truth)[0]
            mats.append(mat)
        agreement[o] = sum(mats) / len(mats)
    return pd.DataFrame(rows), agreement


def _robustness(pools, data: CircuitData, truths, s: StudySettings) -> pd.DataFrame:
    """The paper's CUD across circuit sizes, distances and binary/weighted circuits: mean ρ over
    pools, and each variant's rank agreement with the main CUD."""
    rows = []
    for n in s.sizes:
        for d in s.distances:
            for w in (False, True):
                per = {key: [] for key in truths}
                vs_main = []
                for p in pools:
                    values = cud_at(data, p.anchors["main"], n, d, w)
                    vs_main.append(spearman(values.reindex(p.held),
                                            p.metrics["cud"].reindex(p.held))[0])
                    for key, truth in truths.items():
                        pairs = held_out_pairs(values, truth, excluded=p.banned)
                        per[key].append(spearman(pairs.metric, pairs.truth)[0])
                for (method, outcome), rhos in per.items():
                    rows.append({"n_edges": n, "distance": d, "weighted": w, "metric": "cud",
                                 "method": method, "outcome": outcome,
                                 "n": int(np.mean([len(p.held) for p in pools])),
                                 "spearman": _mean(rhos), "spearman_sd": _sd(rhos),
                                 "rho_vs_main": _mean(vs_main)})
    return pd.DataFrame(rows)


def _confounds(pools, truths, info: pd.DataFrame | None, heldout: pd.DataFrame
               ) -> pd.DataFrame:
    """Is CUD only a question template or an answer length? CUD's association with each (first
    pool, every sample: Kruskal-Wallis H with epsilon squared; Spearman ρ), the same for the
    difficulty itself, and the held-out ρ of CUD, the selected variant and the best baseline
    within question types and with the answer length held fixed (mean over pools)."""
    if info is None:
        return pd.DataFrame()
    rows = []
    first = pools[0].metrics
    types = info["question_type"].astype(str) if "question_type" in info else None
    lengths = info["n_answer_tokens"].astype(float) if "n_answer_tokens" in info else None

    def kruskal(values: pd.Series) -> tuple[float, float, float]:
        groups = [values[types.reindex(values.index) == g].dropna().to_numpy()
                  for g in sorted(types.unique())]
        groups = [g for g in groups if len(g) >= 2]
        if len(groups) < 2:
            return math.nan, math.nan, math.nan
        h, pv = stats.kruskal(*groups)
        n = sum(len(g) for g in groups)
        return float(h), float(pv), float((h - len(groups) + 1) / (n - len(groups)))

    subjects = {"cud": first["cud"], **{f"difficulty {m} {o}": t for (m, o), t in truths.items()}}
    for name, values in subjects.items():
        values = values.astype(float)
        if types is not None:
            h, pv, eps = kruskal(values)
            rows.append({"quantity": "question type (Kruskal-Wallis H)", "of": name,
                         "value": h, "p": pv, "effect": eps, "effect_name": "epsilon^2"})
        if lengths is not None:
            rho, pv = spearman(values.reindex(lengths.index).to_numpy(), lengths.to_numpy())
            rows.append({"quantity": "answer length (Spearman rho)", "of": name, "value": rho,
                         "p": pv, "effect": rho, "effect_name": "rho"})
    for (method, outcome), truth in truths.items():
        h = heldout[(heldout["method"] == method) & (heldout["outcome"] == outcome)]
        bases = h[h["metric"].map(_is_baseline)].dropna(subset=["spearman"])
        best = bases.sort_values("spearman", ascending=False)["metric"].iloc[0] \
            if not bases.empty else None
        for metric in [m for m in ("cud", "selected", best) if m]:
            within_type, partial = [], []
            for p in pools:
                sign = int(p.directions.get(metric, 1))
                pairs = held_out_pairs(sign * p.metrics[metric].astype(float), truth,
                                       excluded=p.banned)
                keep = list(pairs.ids)
                if types is not None:
                    within_type.append(stratified_spearman(
                        pairs.metric, pairs.truth, types.reindex(keep).to_numpy())[0])
                if lengths is not None:
                    partial.append(partial_spearman(pairs.metric, pairs.truth,
                                                    lengths.reindex(keep).to_numpy()))
            for quantity, values in (("held-out rho within question types", within_type),
                                     ("held-out rho, answer length held fixed", partial)):
                if len(values):
                    rows.append({"quantity": quantity, "of": metric, "method": method,
                                 "outcome": outcome, "value": _mean(values), "p": math.nan,
                                 "effect": math.nan, "effect_name": ""})
    return pd.DataFrame(rows)


# --- the study --------------------------------------------------------------------------------

def run_study(ids: Sequence[str], edge_scores: Tensor, graph: Graph,
              selection: SelectionSettings, outcomes: Mapping[str, pd.DataFrame], *,
              baselines: pd.DataFrame | None = None, anchors: AnchorSet | None = None,
              circuits: Tensor | None = None, settings: StudySettings = StudySettings(),
              circuit_settings: dict | None = None, info: pd.DataFrame | None = None,
              others: Mapping[str, CircuitData] | None = None,
              retest: CircuitData | None = None, forecast: ForecastInputs | None = None,
              progress: Progress | None = None) -> StudyResult:
    """Run the study (see the module docstring). ``ids``/``edge_scores`` (N, E): every sample
    with a circuit; ``circuits``: their (N, E) circuits under ``selection``; ``outcomes``:
    ``{method: outcome table}``; ``baselines``: index id, one column per baseline metric;
    ``anchors``: the user's main anchor set (then one pool: the user's); ``info``: per-sample
    columns ``question_type``, ``n_answer_tokens`` and ``faithfulness_<n>`` where known;
    ``others``: other circuits of the same samples (variants ``cud_<name>``); ``retest``: the
    same samples' circuits from independent corrupted prompts (the test-retest table);
    ``forecast``: the pilots, prices and method flags of the ladder (``settings.ladder``)."""
    ids = [str(i) for i in ids]
    if not outcomes:
        raise ConfigError("the study needs at least one method's outcomes")
    s = settings
    report = within(progress, "validation")
    with_circuit = set(ids)
    outcomes = {m: indexed_by_id(t) for m, t in outcomes.items()}
    outcomes = {m: t.loc[[i for i in t.index if i in with_circuit]] for m, t in outcomes.items()}
    shared = common_ids(outcomes)
    if not shared:
        raise ConfigError("no sample has both a circuit and an outcome of every method")
    if info is not None:
        info = indexed_by_id(info)
    sizes = sorted(set(s.variant_sizes) | set(s.sizes)) if s.variants else sorted(set(s.sizes))
    faith = _faithfulness_table(info)
    report(0, None, "circuits of every size")
    data = CircuitData.build(ids, graph, edge_scores, selection, circuits, sizes, faith,
                             others)
    structure = structure_features(graph, data.circuits[data.size]) \
        if s.predictor or s.ladder else None
    truths = _truths(outcomes, s.outcomes)
    pools = _draw_pools(shared, outcomes, s, anchors)
    all_stats, all_nulls = [], []
    for k, p in enumerate(pools):
        report(k, len(pools), f"anchor pool {k + 1}")
        _score_pool(p, data, outcomes, baselines, info, structure, s)
        st, nulls = _pool_statistics(p, truths, s)
        all_stats.append(st)
        all_nulls.append(nulls)
    heldout, per_pool = _heldout_tables(pools, all_stats, all_nulls, truths, s)
    report(len(pools), len(pools), "cross-method, robustness")
    cross, agreement = _cross_method(pools, data, outcomes, truths, s)
    robust = _robustness(pools, data, truths, s)
    paired = _paired_table(heldout, all_stats, pools, truths, s)
    confounds = _confounds(pools, truths, info, heldout)
    variants = pd.DataFrame([{"pool": p.seed, "variant": name, "validation_spearman": score,
                              "validation_n": p.info.get("validation_n"),
                              "selected": name == p.selected}
                             for p in pools for name, score in p.info["validation"].items()])
    ladder, forecasters = pd.DataFrame(), {}
    forecast = forecast or ForecastInputs()
    if s.ladder:
        report(len(pools), len(pools), "forecast ladder")
        ladder, forecasters = _ladder(pools, data, outcomes, info, structure, truths, shared,
                                      forecast, s)
    retest_table = pd.DataFrame()
    if retest is not None:
        report(len(pools), len(pools), "test-retest")
        retest_table = _retest(data, retest, pools[0], s)
    first = pools[0]
    metrics = first.metrics.copy()
    metrics.insert(0, "anchor_role", [first.anchors["main"].role(i) for i in ids])
    metrics.insert(1, "held_out", [i in set(first.held) for i in ids])
    per_sample = _per_sample(pools)
    return StudyResult(
        heldout=heldout, cross_method=cross, agreement=agreement, robustness=robust,
        metrics=metrics, anchors=first.anchors, held_out=first.held,
        excluded=sorted(first.banned), predictor=first.info.get("predictor", {}), settings=s,
        per_pool=per_pool, paired=paired, variants=variants, confounds=confounds,
        retest=retest_table, per_sample=per_sample, ladder=ladder, forecasters=forecasters,
        flags={m: f for m, f in forecast.flags.items() if m in outcomes},
        pools=[{"seed": p.seed, "pool": p.pool, "held_out": p.held, "selected": p.selected,
                "faithful_size": p.info.get("faithful_size"),
                "anchors": {n: a.to_dict() for n, a in p.anchors.items()}} for p in pools])


def _ladder(pools: list[_Pool], data: CircuitData, outcomes, info, structure, truths,
            shared: list[str], forecast: ForecastInputs, s: StudySettings):
    """The forecast ladder (:func:`cud.difficulty.ladder.ladder_table`) on the study's pools:
    for each method, each pool seen with that method's own anchors (CUD and its variants scored
    with them, the baselines read as the study read them, the question type's mean over the
    pool of that method's difficulty, the method's pilot), plus the circuit-structure
    statistics and one-hot question types as forecaster inputs. The seconds CUD's scoring takes
    once the circuits exist (anchor circuits and distances) join the circuits' price."""
    ids = data.ids
    extra = pd.DataFrame(index=pd.Index(ids, name="id"))
    if structure is not None:
        extra = extra.join(structure.set_axis(ids).add_prefix("s_"))
    if info is not None and "question_type" in info:
        extra = extra.join(one_hot_types(info["question_type"].reindex(ids).fillna("")))
    views: dict[str, list[PoolView]] = {}
    timings = []
    for m, table in outcomes.items():
        target = difficulty(table, s.anchor_outcome)
        # the study's own CUD columns serve when this method's anchors are the main ones in
        # every pool (a one-method study); else every pool is scored with the method's anchors
        own = all((p.anchors.get(m, p.anchors["main"]).easy,
                   p.anchors.get(m, p.anchors["main"]).hard)
                  == (p.anchors["main"].easy, p.anchors["main"].hard) for p in pools)
        for p in pools:
            anchors = p.anchors.get(m, p.anchors["main"])
            scores = pd.DataFrame(index=pd.Index(ids, name="id"))
            began = time.perf_counter()
            cud = cud_at(data, anchors, data.size, s.distance, s.weighted)
            timings.append((time.perf_counter() - began) / max(1, len(ids)))
            if own:
                for c in p.metrics.columns:
                    if is_cud(c):
                        scores[c] = p.metrics[c]
            else:
                if s.variants:
                    variants, _ = variant_scores(data, anchors, p.pool, sizes=s.variant_sizes,
                                                 node_k=s.node_k, knn=s.knn,
                                                 faithfulness_target=s.faithfulness_target)
                    for name, values in variants.items():
                        scores[name] = values
                scores["cud"] = cud
            for c in p.metrics.columns:
                if not is_cud(c) and not c.startswith(OURS_PREFIXES) and c != "question_type":
                    scores[c] = p.metrics[c]
            pool = [i for i in shared if i in p.banned]
            types = _type_means(info, target, pool)
            if len(types):
                scores["question_type"] = types.reindex(scores.index)
            if info is not None and "question_length" in info:
                scores["question_length"] = info["question_length"].reindex(scores.index)
            pilot = forecast.pilots.get(m)
            if pilot is not None:
                for c in pilot.columns:
                    scores[c] = pilot[c].reindex(scores.index).astype(float)
            views.setdefault(m, []).append(PoolView(p.seed, pool, list(anchors.easy),
                                                    list(anchors.hard), list(p.held), scores,
                                                    extra))
    prices = replace(forecast.prices, estimates={**forecast.prices.estimates,
                                                 "cud_scoring": float(np.median(timings))})
    table, fits = ladder_table(views, truths, prices=prices, collapsed=forecast.collapsed(),
                               n_boot=s.n_boot, ci=s.ci)
    summary = {m: {o: {name: {k: v for k, v in fit.items() if k != "train_ids"}
                       | {"n_train": len(fit["train_ids"])} for name, fit in by_name.items()}
                   for o, by_name in by_outcome.items()} for m, by_outcome in fits.items()}
    return table, summary


def _retest(data: CircuitData, retest: CircuitData, first: _Pool, s: StudySettings
            ) -> pd.DataFrame:
    """Test-retest of every variant of the first pool's main anchors (and the selected one)."""
    main = first.anchors["main"]
    kw = dict(sizes=s.variant_sizes, node_k=s.node_k, knn=s.knn,
              faithfulness_target=s.faithfulness_target)
    a, _ = variant_scores(data, main, first.pool, **kw) if s.variants else ({}, {})
    b, _ = variant_scores(retest, main, first.pool, **kw) if s.variants else ({}, {})
    a["cud"] = cud_at(data, main, data.size, s.distance, s.weighted)
    b["cud"] = cud_at(retest, main, retest.size, s.distance, s.weighted)
    scores = {name: (a[name], b[name]) for name in a if name in b}
    return retest_table(data, retest, main, scores, n_boot=s.n_boot, ci=s.ci, seed=s.seed)


def _per_sample(pools: list[_Pool]) -> pd.DataFrame:
    """Long table: pool, id, role (easy/hard anchor, pool, held-out), one column per metric."""
    frames = []
    for p in pools:
        f = p.metrics.copy()
        main = p.anchors["main"]
        f.insert(0, "role", ["easy anchor" if i in main.easy else "hard anchor" if i in main.hard
                             else "pool" if i in p.banned else "held-out" for i in f.index])
        f.insert(0, "pool", p.seed)
        frames.append(f.reset_index())
    return pd.concat(frames, ignore_index=True)


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
    tables = {name: table(name) for name in StudyResult.TABLES}
    return StudyResult(agreement=agreement, metrics=table("metrics"),
                       anchors={n: AnchorSet.from_dict(a) for n, a in meta["anchors"].items()},
                       held_out=meta["held_out"], excluded=meta["excluded"],
                       predictor=meta.get("predictor", {}), settings=settings,
                       forecasters=meta.get("forecasters", {}), flags=meta.get("flags", {}),
                       per_sample=table("per_sample"), pools=meta.get("pools", []), **tables)
