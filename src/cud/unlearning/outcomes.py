"""Per-sample outcome metrics (METHOD §6): how well a model knows each QA sample's answer.

Every metric is returned per sample, keyed by sample id, and has a named direction in
:data:`METRICS` (which way means "more forgotten"). Tables are pandas DataFrames indexed by ``id``
and are written as Parquet and CSV, with a ``.metrics.json`` naming each column's direction, by
:func:`save_outcomes`. (The metric definitions are model-level helpers,
:func:`cud.models.answers.answer_metrics`.)

Teacher-forced metrics (NLL, probability, exact memorisation, extraction strength) and the truth
ratio's paraphrased and perturbed answers come from one pass in which each question's prompt runs
once for all its answers (:mod:`cud.models.variants`). ROUGE-L needs greedy answers: batched,
key-value cached decoding, each row stopping at its own end or budget
(:mod:`cud.models.decoding`).

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
from cud.models.answers import answer_metrics, frame
from cud.models.decoding import eos_token_ids, greedy_decode
from cud.models.loading import LoadedModel
from cud.models.precision import evaluation_precision
from cud.models.variants import answer_token_scores
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
    """Greedy answer text per sample id (:func:`cud.models.decoding.greedy_decode`: batched,
    key-value cached, each row stopping at the end-of-sequence token or its own budget).

    A sample's budget is ``max_new_tokens`` or else ``budget`` times its true answer's tokens plus
    8 (ROUGE-L recall reads the reference's tokens, so a budget a little above 1 loses little of
    it on long answers); it depends on the sample alone, never on its batch mates.
    """
    model, tok = lm.model, lm.tokenizer
    encoded = encode_samples(tok, samples, max_length=lm.adapter.max_positions)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    eos = eos_token_ids(model, tok)
    answers: dict[str, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        prompts = [e.input_ids[:e.answer_mask.index(True)] for e in chunk]
        budgets = [max_new_tokens or math.ceil(budget * sum(e.answer_mask)) + 8 for e in chunk]
        tokens = greedy_decode(model, prompts, budgets, pad_id=lm.pad_token_id, eos_ids=eos,
                               device=lm.device)
        for e, row in zip(chunk, tokens):
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

def truth_ratios(lm: LoadedModel, samples: Sequence[QASample], *, batch_size: int = 16,
                 progress: Progress | None = None) -> pd.Series:
    """TOFU's truth ratio per sample: exp(NLL_paraphrased - mean_k NLL_perturbed_k), i.e. the
    geometric mean of the perturbed answers' normalised probabilities over the paraphrased
    answer's. Near 0: the model prefers the true answer; near 1 or above: it cannot tell.

    Reads ``extra["perturbed_answer"]`` (a string or list) and ``extra["paraphrased_answer"]``
    (default: the answer). NaN for samples without perturbed answers.
    """
    return _scored(lm, samples, truth=True, answers=False, batch_size=batch_size,
                   progress=progress, task="truth ratio")["truth_ratio"]


def _variants(sample: QASample) -> list[QASample]:
    """The paraphrased answer (default: the answer) then each perturbed answer, as samples."""
    pert = sample.extra["perturbed_answer"]
    pert = [pert] if isinstance(pert, str) else list(pert)
    para = sample.extra.get("paraphrased_answer") or sample.answer
    return [QASample(id=f"{sample.id}\x00{j}", question=sample.question, answer=answer,
                     source=sample.source) for j, answer in enumerate([para] + pert)]


@torch.no_grad()
def _scored(lm: LoadedModel, samples: Sequence[QASample], *, truth: bool, answers: bool,
            batch_size: int, progress: Progress | None, task: str) -> pd.DataFrame:
    """The teacher-forced metrics of each sample's answer (``answers``) and its truth ratio
    (``truth``) from one prompt-shared pass (:mod:`cud.models.variants`): every answer a
    question is scored against shares one run of its prompt."""
    owners: list[tuple[str, str]] = []   # (sample id, "answer" | "para" | "pert")
    variants: list[QASample] = []
    for s in samples:
        if answers:
            variants.append(s)
            owners.append((s.id, "answer"))
        if truth and has_perturbations(s):
            extra = _variants(s)
            variants.extend(extra)
            owners.extend((s.id, "para" if j == 0 else "pert") for j in range(len(extra)))
    ids = [s.id for s in samples]
    result = pd.DataFrame(index=pd.Index(ids, name="id"))
    if not variants:
        result["truth_ratio"] = np.nan
        return result
    encoded = encode_samples(lm.tokenizer, variants, max_length=lm.adapter.max_positions)
    scores = answer_token_scores(lm.model, encoded, pad_token_id=lm.pad_token_id,
                                 device=lm.device, batch_size=batch_size, progress=progress,
                                 task=task)
    rows: dict[str, dict] = {}
    para: dict[str, float] = {}
    pert: dict[str, list[float]] = {}
    for (sid, kind), sc in zip(owners, scores):
        if kind == "answer":
            rows[sid] = answer_metrics(sc.nll, sc.correct)
        elif kind == "para":
            para[sid] = sc.nll
        else:
            pert.setdefault(sid, []).append(sc.nll)
    if answers:
        result = frame(rows, ids)
    if truth:
        result["truth_ratio"] = [math.exp(para[i] - float(np.mean(pert[i]))) if i in para
                                 else np.nan for i in ids]
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
                      bf16: bool = False, progress: Progress | None = None) -> pd.DataFrame:
    """Per-sample outcome table of ``lm`` on ``samples``: one row per sample id (index ``id``),
    one column per metric in ``metrics`` (see :data:`METRICS` for directions), plus
    ``n_answer_tokens`` and, with ROUGE-L, the ``greedy_answer`` text.

    ``truth_ratio`` is NaN for samples without perturbed answers (see
    :func:`add_perturbed_answers`). ``bf16``: matrix products in bfloat16, each weight cast once
    for the whole evaluation (:func:`cud.models.precision.evaluation_precision`).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown outcome metric(s) {', '.join(unknown)} "
                          f"(choose from {', '.join(METRICS)})")
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        with evaluation_precision(lm.device, bf16):
            truth = "truth_ratio" in metrics
            task = "answers and truth ratio" if truth else "answers"
            df = _scored(lm, samples, truth=truth, answers=True, batch_size=batch_size,
                         progress=progress, task=task)
            df = df[[m for m in TEACHER_FORCED if m in metrics] + ["n_answer_tokens"]
                    + (["truth_ratio"] if truth else [])]
            if "rougeL_recall" in metrics:
                greedy = greedy_answers(lm, samples, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, budget=generation_budget,
                                        progress=progress)
                df["rougeL_recall"] = [rouge_l_recall(greedy[s.id], _reference(lm, s))
                                       for s in samples]
                df["greedy_answer"] = [greedy[s.id] for s in samples]
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
                  generation_budget: float = 2.0, bf16: bool = False) -> dict[str, float]:
    """TOFU-style model utility: for each named set (e.g. ``retain``, ``general``) the mean answer
    probability, ROUGE-L recall and, where perturbed answers exist, max(0, 1 - truth ratio); the
    utility is the harmonic mean of all of them. Higher = more useful (an aggregate)."""
    parts: dict[str, float] = {}
    for name, samples in sets.items():
        if not samples:
            continue
        df = evaluate_outcomes(lm, samples, metrics=("prob", "rougeL_recall", "truth_ratio"),
                               batch_size=batch_size, generation_budget=generation_budget,
                               bf16=bf16)
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
