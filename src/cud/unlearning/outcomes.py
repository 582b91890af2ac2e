"""Per-sample outcome metrics (METHOD §6): how well a model knows each QA sample's answer.

Every metric is returned per sample, keyed by sample id, and has a named direction in
:data:`METRICS` (which way means "more forgotten"). Tables are pandas DataFrames indexed by ``id``
and are written as Parquet and CSV, with a ``.metrics.json`` naming each column's direction, by
:func:`save_outcomes`. (The teacher-forced metrics themselves are model-level helpers,
:func:`cud.models.answers.teacher_forced_outcomes`.)

Teacher-forced metrics (NLL, probability, exact memorisation, extraction strength) come from one
forward pass per batch. ROUGE-L needs greedy generation; the truth ratio one forward pass per
(paraphrased or perturbed) answer.

Text samples (:mod:`cud.data.text`) are encoded as prefix (prompt) and continuation (answer), so
every metric reads the continuation: its NLL, probability, exact memorisation, extraction
strength, and the ROUGE-L recall of the greedy continuation of the prefix against the
continuation as encoded (:func:`cud.data.text.continuation_text`, after any cut). A text has no
perturbed answers: its truth ratio is NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from cud.data.encoding import encode_samples
from cud.data.prepare import has_perturbations
from cud.data.samples import QASample
from cud.data.text import continuation_text, is_text
from cud.errors import ConfigError
from cud.models.answers import teacher_forced_outcomes
from cud.models.loading import LoadedModel
from cud.progress import Progress, within
from cud.tables import save_table


@dataclass(frozen=True)
class MetricInfo:
    """``forgotten``: "higher" when a higher value means more forgotten, else "lower"."""

    forgotten: str
    description: str

    @property
    def direction(self) -> str:
        return f"{self.forgotten} = more forgotten"

    @property
    def sign(self) -> int:
        """+1 when higher = more forgotten; multiply by it to get a 'forgetting' score."""
        return 1 if self.forgotten == "higher" else -1


#: outcome metric -> its direction and meaning
METRICS: dict[str, MetricInfo] = {
    "nll": MetricInfo("higher", "mean answer NLL per token (teacher-forced)"),
    "prob": MetricInfo("lower", "normalised answer probability p(y|x)^(1/|y|) = exp(-nll)"),
    "exact_mem": MetricInfo("lower", "fraction of answer tokens that are the teacher-forced "
                                     "argmax"),
    "extraction_strength": MetricInfo("lower", "1 - k/|y|, k the shortest answer prefix from "
                                               "which greedy decoding gives the rest"),
    "rougeL_recall": MetricInfo("lower", "ROUGE-L recall of the greedy answer against the "
                                         "true answer"),
    "truth_ratio": MetricInfo("higher", "geometric-mean normalised probability of perturbed "
                                        "answers over that of the paraphrased answer (TOFU)"),
}
TEACHER_FORCED = ("nll", "prob", "exact_mem", "extraction_strength")
ALL_METRICS = tuple(METRICS)


# --- greedy answers and ROUGE-L -----------------------------------------------------------------

@torch.no_grad()
def greedy_answers(lm: LoadedModel, samples: Sequence[QASample], *, batch_size: int = 16,
                   max_new_tokens: int | None = None, budget: float = 2.0,
                   progress: Progress | None = None) -> dict[str, str]:
    """Greedy answer text per sample id (prompt left-padded; stops at the end-of-sequence token).

    ``max_new_tokens`` defaults to ``budget`` times the longest true answer in the batch plus 8
    tokens (ROUGE-L recall reads the reference's tokens, so a budget a little above 1 loses
    little of it on long answers).
    """
    model, tok = lm.model, lm.tokenizer
    encoded = encode_samples(tok, samples, max_length=lm.adapter.max_positions)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = lm.pad_token_id
    eos = [t for t in {getattr(tok, "eos_token_id", None),
                       getattr(getattr(model, "generation_config", None), "eos_token_id", None)}
           if t is not None]
    eos_ids = sorted({x for t in eos for x in (t if isinstance(t, list) else [t])})
    answers: dict[str, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        prompts = [e.input_ids[:e.answer_mask.index(True)] for e in chunk]
        n_answer = max(sum(e.answer_mask) for e in chunk)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: generation continues at the right edge
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max_new_tokens or math.ceil(budget * n_answer) + 8
        out = model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                             max_new_tokens=new, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=eos_ids or None,
                             temperature=None, top_p=None, top_k=None)
        for e, row in zip(chunk, out[:, width:].tolist()):
            answers[e.id] = tok.decode(row, skip_special_tokens=True).strip()
        within(progress, "greedy answers")(min(start + batch_size, len(order)), len(order))
    return {s.id: answers[s.id] for s in samples}


_SCORER = None


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (``rouge-score``, with stemming)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, prediction)["rougeL"].recall)


# --- truth ratio and forget quality -------------------------------------------------------------

@torch.no_grad()
def truth_ratios(lm: LoadedModel, samples: Sequence[QASample], *, batch_size: int = 16,
                 progress: Progress | None = None) -> pd.Series:
    """TOFU's truth ratio per sample: exp(NLL_paraphrased - mean_k NLL_perturbed_k), i.e. the
    geometric mean of the perturbed answers' normalised probabilities over the paraphrased
    answer's. Near 0: the model prefers the true answer; near 1 or above: it cannot tell.

    Reads ``extra["perturbed_answer"]`` (a string or list) and ``extra["paraphrased_answer"]``
    (default: the answer). NaN for samples without perturbed answers.
    """
    variants: list[QASample] = []
    owners: list[tuple[str, str]] = []  # (sample id, "para" | "pert")
    for s in samples:
        if not has_perturbations(s):
            continue
        pert = s.extra["perturbed_answer"]
        pert = [pert] if isinstance(pert, str) else list(pert)
        para = s.extra.get("paraphrased_answer") or s.answer
        for j, answer in enumerate([para] + pert):
            variants.append(QASample(id=f"{s.id}\x00{j}", question=s.question, answer=answer,
                                     source=s.source))
            owners.append((s.id, "para" if j == 0 else "pert"))
    result = pd.Series(np.nan, index=pd.Index([s.id for s in samples], name="id"),
                       name="truth_ratio")
    if not variants:
        return result
    nll = teacher_forced_outcomes(lm, variants, batch_size=batch_size, progress=progress,
                                  task="truth ratio")["nll"]
    para_nll: dict[str, float] = {}
    pert_nll: dict[str, list[float]] = {}
    for (sid, kind), value in zip(owners, nll.to_numpy()):
        if kind == "para":
            para_nll[sid] = float(value)
        else:
            pert_nll.setdefault(sid, []).append(float(value))
    for sid, p in para_nll.items():
        result[sid] = math.exp(p - float(np.mean(pert_nll[sid])))
    return result


def forget_quality(truth_ratio_unlearned: Sequence[float], truth_ratio_reference: Sequence[float]
                   ) -> float:
    """TOFU's forget quality: the KS-test p-value between the truth ratios of the unlearned model
    and of a reference model never trained on the forget set (aggregate, not per sample).
    High (near 1) = indistinguishable from never having learnt it."""
    from scipy.stats import ks_2samp
    a = np.asarray(truth_ratio_unlearned, dtype=float)
    b = np.asarray(truth_ratio_reference, dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) == 0 or len(b) == 0:
        raise ValueError("forget quality needs truth ratios of both models")
    return float(ks_2samp(a, b).pvalue)


# --- everything at once -------------------------------------------------------------------------

def evaluate_outcomes(lm: LoadedModel, samples: Sequence[QASample], *,
                      metrics: Sequence[str] = ALL_METRICS, batch_size: int = 16,
                      max_new_tokens: int | None = None, generation_budget: float = 2.0,
                      progress: Progress | None = None) -> pd.DataFrame:
    """Per-sample outcome table of ``lm`` on ``samples``: one row per sample id (index ``id``),
    one column per metric in ``metrics`` (see :data:`METRICS` for directions), plus
    ``n_answer_tokens`` and, with ROUGE-L, the ``greedy_answer`` text.

    ``truth_ratio`` is NaN for samples without perturbed answers (see
    :func:`add_perturbed_answers`).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown outcome metric(s) {', '.join(unknown)} "
                          f"(choose from {', '.join(METRICS)})")
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        df = teacher_forced_outcomes(lm, samples, batch_size=batch_size, progress=progress)
        df = df[[m for m in TEACHER_FORCED if m in metrics] + ["n_answer_tokens"]]
        if "rougeL_recall" in metrics:
            greedy = greedy_answers(lm, samples, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, budget=generation_budget,
                                    progress=progress)
            df["rougeL_recall"] = [rouge_l_recall(greedy[s.id], _reference(lm, s))
                                   for s in samples]
            df["greedy_answer"] = [greedy[s.id] for s in samples]
        if "truth_ratio" in metrics:
            df["truth_ratio"] = truth_ratios(lm, samples, batch_size=batch_size,
                                             progress=progress)
    finally:
        model.train(was_training)
    return df


def _reference(lm: LoadedModel, sample: QASample) -> str:
    """What the greedy answer is scored against: the answer; of a text, the continuation as
    encoded (split and cut in the model's tokens)."""
    if is_text(sample):
        return continuation_text(lm.tokenizer, sample, max_length=lm.adapter.max_positions)
    return sample.answer


def metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c in METRICS]


def outcome_deltas(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per sample and metric: ``{m}_before``, ``{m}_after`` and ``{m}_delta`` = after - before
    (a delta has its metric's direction: for ``nll`` a positive delta means more forgotten)."""
    common = [m for m in metric_columns(before) if m in after.columns]
    ids = [i for i in before.index if i in after.index]
    out = pd.DataFrame(index=pd.Index(ids, name="id"))
    for m in common:
        b, a = before.loc[ids, m].astype(float), after.loc[ids, m].astype(float)
        out[f"{m}_before"], out[f"{m}_after"], out[f"{m}_delta"] = b, a, a - b
    return out


def forgetting_scores(deltas: pd.DataFrame) -> pd.DataFrame:
    """Per-sample deltas signed so that higher = more forgotten for every metric (for ranking)."""
    out = pd.DataFrame(index=deltas.index)
    for m, info in METRICS.items():
        if f"{m}_delta" in deltas:
            out[m] = info.sign * deltas[f"{m}_delta"]
    return out


def model_utility(lm: LoadedModel, sets: dict[str, Sequence[QASample]], *, batch_size: int = 16,
                  generation_budget: float = 2.0) -> dict[str, float]:
    """TOFU-style model utility: for each named set (e.g. ``retain``, ``general``) the mean answer
    probability, ROUGE-L recall and, where perturbed answers exist, max(0, 1 - truth ratio); the
    utility is the harmonic mean of all of them. Higher = more useful (an aggregate)."""
    parts: dict[str, float] = {}
    for name, samples in sets.items():
        if not samples:
            continue
        df = evaluate_outcomes(lm, samples, metrics=("prob", "rougeL_recall", "truth_ratio"),
                               batch_size=batch_size, generation_budget=generation_budget)
        parts[f"{name}_prob"] = float(df["prob"].mean())
        parts[f"{name}_rougeL_recall"] = float(df["rougeL_recall"].mean())
        tr = df["truth_ratio"].dropna()
        if len(tr):
            parts[f"{name}_truth"] = float(np.clip(1 - tr, 0, None).mean())
    values = list(parts.values())
    parts["model_utility"] = 0.0 if any(v <= 0 for v in values) else \
        len(values) / sum(1 / v for v in values)
    return parts


def save_outcomes(df: pd.DataFrame, path: str | Path) -> tuple[Path, Path]:
    """Write an outcome table as ``<path>.parquet`` and ``<path>.csv`` (:func:`cud.tables.save_table`)
    plus ``<path>.metrics.json`` naming each metric column's direction."""
    parquet, csv = save_table(df, path, index=True)
    directions = {}
    for col in df.columns:
        base = col.rsplit("_", 1)[0] if col.endswith(("_before", "_after", "_delta")) else col
        if base in METRICS:
            directions[col] = METRICS[base].direction
    parquet.with_suffix(".metrics.json").write_text(json.dumps(directions, indent=1) + "\n")
    return parquet, csv
