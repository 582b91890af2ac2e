"""Anchor sets and anchor circuits (METHOD §4).

An :class:`AnchorSet` names the easy (E: most forgotten) and hard (H: least forgotten) anchor
samples and, in ``excluded``, every sample whose post-unlearning outcome was looked at to choose
them; validation never lets one of those into a statistic. Three ways to get one:

- :func:`anchors_from_outcomes`: the reference code's proxy. Per method, the k most and k least
  forgotten samples of a *pool*; a sample is an anchor when a vote of the methods puts it there.
  The pool is a seeded random share of the forget set (ours), so the rest is an unbiased held-out
  set; with ``pool_fraction=1`` anchors come from the whole set and only they are held back.
- :func:`anchors_from_ids`: ids a user supplies.
- :func:`cud.difficulty.bilevel.bilevel_anchors`: the paper's bi-level selection.

:func:`anchor_circuits` averages the anchor samples' edge scores, (N_anchor, E) -> (E,), and
binarises the average with the same selection as per-sample circuits. The result can be saved and
loaded, so new samples can be scored without any unlearning.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings, select
from cud.difficulty.groundtruth import DEFAULT_ANCHOR_OUTCOME, common_ids, forgetting
from cud.errors import ConfigError, DataError, StoreError

ANCHOR_FORMAT = 1
ANCHOR_JSON = "anchors.json"
ANCHOR_TENSORS = "anchors.safetensors"
VOTES = ("majority", "any", "all")


@dataclass
class AnchorSet:
    """Which samples are the easy and hard anchors, and which samples they cost."""

    easy: list[str]
    hard: list[str]
    source: str                   # "outcomes", "ids" or "bilevel"
    excluded: list[str]           # every id whose outcome informed the choice (⊇ easy ∪ hard)
    details: dict = field(default_factory=dict)
    name: str = "anchors"

    def __post_init__(self):
        for side, ids in (("easy", self.easy), ("hard", self.hard)):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                raise ConfigError(f"{side} anchor id(s) {', '.join(twice[:5])} given more than "
                                  f"once")
        both = set(self.easy) & set(self.hard)
        if both:
            raise ConfigError(f"sample(s) {', '.join(sorted(both)[:5])} are both easy and hard "
                              f"anchors")
        if not self.easy or not self.hard:
            raise ConfigError("an anchor set needs at least one easy and one hard sample")
        extra = [i for i in self.easy + self.hard if i not in set(self.excluded)]
        self.excluded = list(self.excluded) + extra

    @property
    def fingerprint(self) -> str:
        blob = json.dumps([sorted(self.easy), sorted(self.hard)]).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def role(self, sample_id: str) -> str:
        return "easy" if sample_id in self.easy else "hard" if sample_id in self.hard else ""

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "easy": self.easy, "hard": self.hard,
                "excluded": self.excluded, "details": self.details}

    @classmethod
    def from_dict(cls, d: dict) -> "AnchorSet":
        return cls(easy=list(d["easy"]), hard=list(d["hard"]), source=d["source"],
                   excluded=list(d["excluded"]), details=d.get("details", {}),
                   name=d.get("name", "anchors"))


def anchor_pool(ids: Sequence[str], fraction: float = 0.5, seed: int = 0) -> list[str]:
    """A seeded random share of ``ids`` (in the order of ``ids``) to choose anchors from."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"the anchor pool fraction must be in (0, 1], got {fraction}")
    ids = list(ids)
    n = max(1, round(len(ids) * fraction))
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:n].tolist())
    return [i for k, i in enumerate(ids) if k in chosen]


def _ranked(score: pd.Series) -> list[str]:
    """Ids by decreasing score, ties by id (deterministic)."""
    frame = pd.DataFrame({"score": score.to_numpy(), "id": score.index.astype(str)})
    return frame.sort_values(["score", "id"], ascending=[False, True])["id"].tolist()


def _threshold(vote: str | int, n_methods: int) -> int:
    if isinstance(vote, int) or (isinstance(vote, str) and vote.isdigit()):
        t = int(vote)
        if not 1 <= t <= n_methods:
            raise ConfigError(f"vote {t} must be between 1 and the number of methods "
                              f"({n_methods})")
        return t
    if vote == "majority":
        return n_methods // 2 + 1
    if vote == "any":
        return 1
    if vote == "all":
        return n_methods
    raise ConfigError(f"unknown vote '{vote}' (choose from {', '.join(VOTES)} or a number)")


def anchors_from_outcomes(outcomes: Mapping[str, pd.DataFrame], k: int, *,
                          outcome: str = DEFAULT_ANCHOR_OUTCOME, vote: str | int = "majority",
                          pool_fraction: float = 0.5, seed: int = 0,
                          pool: Sequence[str] | None = None, name: str | None = None
                          ) -> AnchorSet:
    """Easy/hard anchors from per-method outcome tables (``{method: table indexed by id}``).

    For each method, the pool is ranked by :func:`~cud.difficulty.groundtruth.forgetting` of
    ``outcome``; its ``k`` most forgotten samples get an easy vote, its ``k`` least forgotten a
    hard vote. A sample is an anchor with at least the ``vote`` threshold of votes (``majority``
    = more than half the methods, ``any``, ``all`` or a number); a sample voted both ways is
    dropped. ``pool`` (ids) overrides the seeded ``pool_fraction`` of the shared ids.
    """
    if not outcomes:
        raise ConfigError("anchors from outcomes need at least one method's outcome table")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    shared = common_ids(outcomes)
    pool_given = pool is not None
    if pool is None:
        pool = anchor_pool(shared, pool_fraction, seed)
    else:
        unknown = [i for i in pool if i not in set(shared)]
        if unknown:
            raise DataError(f"pool id(s) {', '.join(unknown[:5])} have no outcome in every "
                            f"method")
        pool = list(pool)
    if 2 * k > len(pool):
        raise ConfigError(f"k={k} easy plus k hard anchors need at least {2 * k} samples in the "
                          f"pool, which has {len(pool)}; lower k or raise the pool fraction")
    threshold = _threshold(vote, len(outcomes))
    easy_votes: dict[str, int] = {i: 0 for i in pool}
    hard_votes: dict[str, int] = {i: 0 for i in pool}
    mean_rank = pd.Series(0.0, index=pool)
    per_method = {}
    for method, table in outcomes.items():
        score = forgetting(table, outcome, source=method).reindex(pool)
        if score.isna().any():
            missing = score.index[score.isna()].tolist()
            raise DataError(f"no '{outcome}' for id(s) {', '.join(missing[:5])}", file=method,
                            field=outcome)
        order = _ranked(score)
        for i in order[:k]:
            easy_votes[i] += 1
        for i in order[-k:]:
            hard_votes[i] += 1
        mean_rank += pd.Series(np.arange(len(order)), index=order).reindex(pool) / len(outcomes)
        per_method[method] = {"easy": order[:k], "hard": order[-k:][::-1]}
    easy = [i for i in pool if easy_votes[i] >= threshold and hard_votes[i] < threshold]
    hard = [i for i in pool if hard_votes[i] >= threshold and easy_votes[i] < threshold]
    if not easy or not hard:
        raise ConfigError(f"no sample is among the {k} {'most' if not easy else 'least'} "
                          f"forgotten of {threshold} of the {len(outcomes)} methods; raise k or "
                          f"relax the vote (e.g. --vote any)")
    # most votes first, then the more extreme mean rank
    easy.sort(key=lambda i: (-easy_votes[i], mean_rank[i], i))
    hard.sort(key=lambda i: (-hard_votes[i], -mean_rank[i], i))
    methods = list(outcomes)
    details = {"methods": methods, "k": k, "outcome": outcome, "vote": vote,
               "threshold": threshold, "pool_fraction": None if pool_given else pool_fraction,
               "seed": seed, "pool_size": len(pool), "per_method": per_method}
    label = name or (methods[0] if len(methods) == 1 else f"{vote}:{'+'.join(methods)}")
    # with a pool smaller than the set, every pool sample's outcome was read: hold all back;
    # with the whole set as pool, only the anchors themselves (the rest would be nothing)
    excluded = list(pool) if len(pool) < len(shared) else easy + hard
    return AnchorSet(easy=easy, hard=hard, source="outcomes", excluded=excluded,
                     details=details, name=label)


def anchors_from_ids(easy: Iterable[str], hard: Iterable[str], *,
                     known: Iterable[str] | None = None, name: str = "user") -> AnchorSet:
    """Anchors a user names. ``known``: the ids that exist (an unknown anchor id is an error)."""
    easy, hard = [str(i) for i in easy], [str(i) for i in hard]
    if known is not None:
        known = set(known)
        unknown = [i for i in easy + hard if i not in known]
        if unknown:
            raise DataError(f"anchor id(s) {', '.join(unknown[:5])} are not among the samples")
    return AnchorSet(easy=easy, hard=hard, source="ids", excluded=easy + hard, name=name)


#: anchor circuit pairs kept per graph. A study selects the same anchors' circuits again for
#: many variants, pools and tables (a default run's validation: hundreds of selections, each a
#: greedy walk over the whole graph); selection is deterministic, so a repeat is read back.
ANCHOR_SELECTIONS_KEPT = 64


def _select_anchor_pair(graph: Graph, scores: Tensor, selection: SelectionSettings) -> Tensor:
    """:func:`select` of the (2, E) easy and hard mean scores, remembered on ``graph`` by the
    scores' bytes and the selection (the least recently used pair is dropped first)."""
    key = (selection, str(scores.dtype),
           hashlib.sha1(scores.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest())
    memo = graph._cache.setdefault("anchor_selections", OrderedDict())
    if key in memo:
        memo.move_to_end(key)
    else:
        memo[key] = select(graph, scores, selection)
        while len(memo) > ANCHOR_SELECTIONS_KEPT:
            memo.popitem(last=False)
    return memo[key].clone()


@dataclass
class AnchorCircuits:
    """The anchor circuits C_E and C_H of an anchor set, with the averaged edge scores they were
    selected from (so they can be re-selected at another circuit size)."""

    anchors: AnchorSet
    easy_scores: Tensor          # (E,) mean edge scores of the easy anchors
    hard_scores: Tensor          # (E,) ... of the hard anchors
    graph: Graph
    selection: SelectionSettings
    circuit_settings: dict = field(default_factory=dict)  # how the per-sample scores were made

    def __post_init__(self):
        both = _select_anchor_pair(self.graph, torch.stack([self.easy_scores, self.hard_scores]),
                                   self.selection)
        self.easy_circuit, self.hard_circuit = both[0], both[1]   # (E,) bool each

    def with_selection(self, selection: SelectionSettings) -> "AnchorCircuits":
        """The same anchors binarised with another selection (e.g. another circuit size)."""
        return replace(self, selection=selection)

    def save(self, folder: str | Path) -> Path:
        """Write ``anchors.json`` and ``anchors.safetensors`` into ``folder``."""
        from safetensors.torch import save_file
        root = Path(folder)
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root}: output path exists and is not a folder")
        root.mkdir(parents=True, exist_ok=True)
        save_file({"easy_scores": self.easy_scores.float().contiguous(),
                   "hard_scores": self.hard_scores.float().contiguous()},
                  str(root / ANCHOR_TENSORS))
        meta = {"kind": "cud-anchors", "format_version": ANCHOR_FORMAT,
                "anchors": self.anchors.to_dict(), "graph": self.graph.cfg,
                "n_edges": self.graph.n_edges, "selection": self.selection.to_dict(),
                "circuit_settings": self.circuit_settings,
                "easy_circuit_edges": int(self.easy_circuit.sum()),
                "hard_circuit_edges": int(self.hard_circuit.sum())}
        (root / ANCHOR_JSON).write_text(json.dumps(meta, indent=1, default=str) + "\n")
        return root


def load_anchors(folder: str | Path) -> AnchorCircuits:
    """Read what :meth:`AnchorCircuits.save` wrote."""
    from safetensors.torch import load_file
    root = Path(folder)
    meta_path = root / ANCHOR_JSON
    if not meta_path.is_file():
        raise StoreError(f"{root}: not an anchors folder (no {ANCHOR_JSON}); make one with "
                         f"`cud anchors --out`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("kind") != "cud-anchors" or meta.get("format_version") != ANCHOR_FORMAT:
        raise StoreError(f"{meta_path}: not a cud anchors file of format {ANCHOR_FORMAT}")
    tensors = load_file(str(root / ANCHOR_TENSORS))
    return AnchorCircuits(anchors=AnchorSet.from_dict(meta["anchors"]),
                          easy_scores=tensors["easy_scores"], hard_scores=tensors["hard_scores"],
                          graph=Graph(**meta["graph"]),
                          selection=SelectionSettings(**meta["selection"]),
                          circuit_settings=meta.get("circuit_settings", {}))


def _rows(ids: Sequence[str], wanted: Sequence[str]) -> Tensor:
    where = {i: k for k, i in enumerate(ids)}
    missing = [i for i in wanted if i not in where]
    if missing:
        raise DataError(f"no circuit for anchor id(s) {', '.join(missing[:5])}")
    return torch.tensor([where[i] for i in wanted], dtype=torch.long)


def anchor_circuits(anchors: AnchorSet, ids: Sequence[str], edge_scores: Tensor, graph: Graph,
                    selection: SelectionSettings = SelectionSettings(), *,
                    circuit_settings: dict | None = None) -> AnchorCircuits:
    """Average the anchor samples' edge scores (rows of ``edge_scores`` (N, E), row k = sample
    ``ids[k]``) per anchor set and binarise with ``selection``."""
    if edge_scores.shape != (len(ids), graph.n_edges):
        raise ConfigError(f"edge scores of shape {tuple(edge_scores.shape)} do not match "
                          f"{len(ids)} ids x {graph.n_edges} edges")
    scores = edge_scores.float()
    easy = scores[_rows(ids, anchors.easy)].mean(0)
    hard = scores[_rows(ids, anchors.hard)].mean(0)
    return AnchorCircuits(anchors, easy, hard, graph, selection, dict(circuit_settings or {}))


def selection_of(settings: Mapping) -> SelectionSettings:
    """The :class:`SelectionSettings` recorded in a circuits folder's settings dict."""
    return SelectionSettings(selection=settings.get("selection", "greedy"),
                             n_edges=int(settings.get("n_edges", 75)),
                             threshold=settings.get("threshold"))


#: what decides per-sample scores besides the graph; anchors and circuits must agree on all
COMPATIBLE_KEYS = ("model_fingerprint", "scores_version", "method", "steps", "metric", "ablation",
                   "draws", "seed", "reference")
SELECTION_KEYS = ("selection", "n_edges", "threshold")


def check_compatible(anchors: AnchorCircuits, graph: Graph, circuit_settings: Mapping, *,
                     selection: bool = True) -> None:
    """Anchors can only score circuits of the same graph, attributed the same way on the same
    model (same weights, corrupted prompts, ...), and, unless the caller re-selects both sides
    at one size (``selection=False``), selected the same way."""
    if anchors.graph.cfg != graph.cfg:
        raise ConfigError(f"the anchors were made on another graph ({anchors.graph.cfg}) than "
                          f"these circuits ({graph.cfg})")
    theirs = anchors.circuit_settings
    keys = COMPATIBLE_KEYS + (SELECTION_KEYS if selection else ())
    changed = [k for k in keys if theirs.get(k) != circuit_settings.get(k)]
    if changed:
        what = ", ".join(f"{k}: {theirs.get(k)!r} vs {circuit_settings.get(k)!r}"
                         for k in changed)
        raise ConfigError(f"the anchors' circuits were made differently from these circuits "
                          f"({what}); rebuild the anchors from circuits made like these")
