"""What a model says about each sample's answer, teacher-forced: the answer-token scoring every
later stage builds on (fine-tuning and every unlearning loss, outcome metrics, baseline metrics).

Everything reads the answer tokens only (the prompt is masked). Logits at position t predict token
t+1, so the positions that matter are the *prediction positions*: t such that token t+1 is an
answer token. Logits are computed only there (``logits_to_keep`` with a boolean mask, when the
model supports it): on a chat-formatted QA sample that is a few positions out of ~50, which saves
most of the read-out's cost and memory. The result is *packed*: one row per answer token of the
batch, with the row's sample index, so per-sample sums and means are one ``index_add``.

:func:`teacher_forced_outcomes` turns one such pass per batch into per-sample answer NLL,
probability, exact memorisation and extraction strength.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cud.data.encoding import Batch, batches, encode_samples
from cud.data.samples import QASample
from cud.models.loading import LoadedModel
from cud.progress import Progress, within


def prediction_mask(batch: Batch) -> Tensor:
    """(B, T) bool: True at positions whose next token is an answer token."""
    mask = torch.zeros_like(batch.answer_mask)
    mask[:, :-1] = batch.answer_mask[:, 1:]
    return mask


@dataclass
class AnswerLogits:
    """Packed logits of the answer tokens of a batch. N = number of answer tokens in the batch."""

    logits: Tensor          # (N, V) logits predicting each answer token
    targets: Tensor         # (N,) the true answer token ids
    rows: Tensor            # (N,) index of the sample (batch row) each answer token belongs to
    n_tokens: Tensor        # (B,) answer tokens per sample
    hidden_states: tuple[Tensor, ...] | None = None  # HF hidden states (each (B, T, d)) if asked

    @property
    def batch_size(self) -> int:
        return int(self.n_tokens.shape[0])

    def token_logprobs(self) -> Tensor:
        """(N,) log p(answer token | prefix), float32."""
        logp = self.logits.float().log_softmax(-1)
        return logp.gather(-1, self.targets[:, None])[:, 0]

    def per_sample_sum(self, values: Tensor) -> Tensor:
        """(N,) -> (B,) sums over each sample's answer tokens."""
        out = torch.zeros(self.batch_size, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.rows, values)

    def per_sample_mean(self, values: Tensor) -> Tensor:
        """(N,) -> (B,) means over each sample's answer tokens."""
        return self.per_sample_sum(values) / self.n_tokens.to(values.dtype)

    def sequence_logprob(self) -> Tensor:
        """(B,) log π(y|x): the sum of the answer tokens' log-probabilities."""
        return self.per_sample_sum(self.token_logprobs())

    def nll(self) -> Tensor:
        """(B,) mean answer NLL per token (differentiable)."""
        return -self.per_sample_mean(self.token_logprobs())

    def correct(self) -> Tensor:
        """(N,) bool: the argmax (greedy) token equals the true token."""
        return self.logits.argmax(-1) == self.targets


_PACKED_SUPPORT: dict[type, bool] = {}


def answer_logits(model: torch.nn.Module, batch: Batch, *, output_hidden_states: bool = False
                  ) -> AnswerLogits:
    """Run ``model`` on ``batch`` and keep the logits of the answer tokens only.

    ``batch`` must already be on the model's device.
    """
    pred = prediction_mask(batch)
    targets_full = torch.zeros_like(batch.input_ids)
    targets_full[:, :-1] = batch.input_ids[:, 1:]
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                  output_hidden_states=output_hidden_states, use_cache=False)
    cls = type(model)
    logits = None
    if _PACKED_SUPPORT.get(cls, True):
        try:
            out = model(**kwargs, logits_to_keep=pred)
            if out.logits.ndim == 2 and out.logits.shape[0] == int(pred.sum()):
                logits = out.logits
                _PACKED_SUPPORT[cls] = True
            else:  # the keyword was accepted but not understood: fall back for good
                _PACKED_SUPPORT[cls] = False
                logits = out.logits[pred] if out.logits.shape[:2] == pred.shape else None
        except TypeError:
            _PACKED_SUPPORT[cls] = False
    if logits is None:
        out = model(**kwargs)
        logits = out.logits[pred]
    rows = torch.arange(pred.shape[0], device=pred.device)[:, None].expand_as(pred)[pred]
    return AnswerLogits(logits=logits, targets=targets_full[pred], rows=rows,
                        n_tokens=pred.sum(1),
                        hidden_states=out.hidden_states if output_hidden_states else None)


def answer_nll(model: torch.nn.Module, batch: Batch) -> Tensor:
    """(B,) mean answer NLL per sample, differentiable. The loss every method builds on."""
    return answer_logits(model, batch).nll()


@torch.no_grad()
def teacher_forced_outcomes(lm: LoadedModel, samples: Sequence[QASample], *, batch_size: int = 16,
                            progress: Progress | None = None, task: str = "answers"
                            ) -> pd.DataFrame:
    """nll, prob, exact_mem, extraction_strength and n_answer_tokens per sample (index ``id``).

    One forward pass per batch suffices (see :func:`answer_metrics`).
    """
    model = lm.model
    encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    report = within(progress, task)
    rows: dict[str, dict] = {}
    done = 0
    for batch in batches(encoded, batch_size, lm.pad_token_id):
        out = answer_logits(model, batch.to(lm.device))
        nll = -out.per_sample_mean(out.token_logprobs())
        correct = out.correct()
        exact = out.per_sample_mean(correct.float())
        for i, sid in enumerate(batch.ids):
            rows[sid] = answer_metrics(float(nll[i]), correct[out.rows == i].cpu().numpy(),
                                       exact=float(exact[i]))
        done += len(batch)
        report(done, len(encoded))
    return frame(rows, [s.id for s in samples])


def answer_metrics(nll: float, correct: np.ndarray, *, exact: float | None = None) -> dict:
    """The teacher-forced metrics of one answer from its mean NLL and, per answer token, whether
    the argmax is the true token: nll, prob, exact_mem, extraction_strength, n_answer_tokens.

    Extraction strength uses that greedy decoding from a prefix reproduces the rest of the answer
    exactly when every later answer token is the teacher-forced argmax: k is one past the last
    answer token that is not the argmax (0 when all are)."""
    wrong = np.flatnonzero(~correct)
    k = int(wrong[-1]) + 1 if len(wrong) else 0
    return {"nll": nll, "prob": math.exp(-nll),
            "exact_mem": float(correct.mean()) if exact is None else exact,
            "extraction_strength": 1.0 - k / len(correct), "n_answer_tokens": len(correct)}


def frame(rows: dict[str, dict], order: Iterable[str]) -> pd.DataFrame:
    """Per-sample rows (id -> metrics) as a table indexed by ``id``, in ``order``."""
    df = pd.DataFrame.from_dict(rows, orient="index").loc[list(order)]
    df.index.name = "id"
    return df


