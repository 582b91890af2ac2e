"""Teacher-forced answer scores of many answers to one prompt, the prompt run once.

The evaluation scores up to seven answers per question: the true answer, TOFU's paraphrased
answer and its perturbed answers (the truth ratio). Run one by one, the prompt (about half of a
TOFU sequence) is recomputed for each. Here the encoded sequences are grouped by their prompt
tokens (everything before the first answer token); each group's prompt is run once into a
key-value cache, the cache rows are repeated once per answer, and one more pass over the answers
alone, right-padded and placed at positions after their prompt, gives the logits of every
answer token. The first answer token is predicted by the prompt's last position.

The result is the same teacher-forced log-probabilities a full pass gives (up to float rounding
of differently shaped matrix products), for models whose ``forward`` takes a cache; any other
model is scored by full passes (:func:`cud.models.answers.answer_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cud.data.encoding import EncodedSample, batches
from cud.models.answers import answer_logits
from cud.models.decoding import cache_keyword, cached_forward, left_padded, new_cache
from cud.progress import Progress, within


@dataclass(frozen=True)
class TokenScores:
    """Per answer token of one sequence: log p(token | everything before it) and whether the
    token is the argmax (greedy) prediction."""

    logprobs: np.ndarray   # (n,) float32
    correct: np.ndarray    # (n,) bool

    @property
    def nll(self) -> float:
        """Mean answer NLL per token."""
        return float(-self.logprobs.astype(np.float64).mean())


def _split(e: EncodedSample) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    first = e.answer_mask.index(True)
    return e.input_ids[:first], e.input_ids[first:], e.answer_mask[first:]


@torch.no_grad()
def answer_token_scores(model: torch.nn.Module, encoded: Sequence[EncodedSample], *,
                        pad_token_id: int, device: torch.device | str = "cpu",
                        batch_size: int = 16, progress: Progress | None = None,
                        task: str = "answers") -> list[TokenScores]:
    """One :class:`TokenScores` per encoded sequence, in order. A batch holds whole prompt
    groups, about ``batch_size`` answers (at least one group)."""
    report = within(progress, task)
    if cache_keyword(model) is None:
        return _full_passes(model, encoded, pad_token_id, device, batch_size, report)
    parts = [_split(e) for e in encoded]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _, _) in enumerate(parts):
        groups.setdefault(prompt, []).append(i)
    order = sorted(groups, key=len)
    result: list[TokenScores | None] = [None] * len(encoded)
    done = 0
    start = 0
    while start < len(order):
        stop, members = start, 0
        while stop < len(order) and (members == 0 or members + len(groups[order[stop]])
                                     <= batch_size):
            members += len(groups[order[stop]])
            stop += 1
        chunk = order[start:stop]
        for i, scores in _score_groups(model, chunk, [groups[p] for p in chunk], parts,
                                       pad_token_id, device):
            result[i] = scores
        done += members
        report(done, len(encoded))
        start = stop
    return result  # type: ignore[return-value]


def _score_groups(model, prompts, members, parts, pad_token_id, device):
    ids, mask, positions = left_padded(prompts, pad_token_id, device)
    cache = new_cache(model)
    first = cached_forward(model, ids, mask, positions, cache, 1)[:, -1].float()
    first = first.log_softmax(-1), first.argmax(-1)
    flat = [(g, i) for g, rows in enumerate(members) for i in rows]
    rows = torch.tensor([g for g, _ in flat], device=device)
    conts = [parts[i][1] for _, i in flat]
    width = max(len(c) for c in conts)
    cont_ids = torch.full((len(flat), width), pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros((len(flat), width), dtype=torch.long)
    keep = torch.zeros((len(flat), width), dtype=torch.bool)
    for r, (_, i) in enumerate(flat):
        cont, answer = parts[i][1], parts[i][2]
        cont_ids[r, :len(cont)] = torch.tensor(cont)
        cont_mask[r, :len(cont)] = 1
        keep[r, :len(cont) - 1] = torch.tensor(answer[1:], dtype=torch.bool)
    cont_ids, cont_mask, keep = cont_ids.to(device), cont_mask.to(device), keep.to(device)
    packed_logp = packed_hit = None
    if bool(keep.any()):
        cache.batch_select_indices(rows)
        attention = torch.cat([mask[rows], cont_mask], 1)
        cont_positions = positions[rows][:, -1:] + 1 + torch.arange(width, device=device)
        logits = cached_forward(model, cont_ids, attention, cont_positions, cache, keep)
        if logits.ndim == 3:     # the model ignored a mask of positions to keep
            logits = logits[keep]
        logits = logits.float()
        targets = torch.zeros_like(cont_ids)
        targets[:, :-1] = cont_ids[:, 1:]
        targets = targets[keep]
        packed_logp = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0].cpu().numpy()
        packed_hit = (logits.argmax(-1) == targets).cpu().numpy()
    counts = keep.sum(1).tolist()
    offset = 0
    first_logp, first_arg = first[0].cpu(), first[1].cpu()
    for r, (g, i) in enumerate(flat):
        t0 = parts[i][1][0]
        lp = [np.float32(first_logp[g, t0])]
        hit = [bool(first_arg[g] == t0)]
        n = counts[r]
        if n:
            lp.extend(packed_logp[offset:offset + n])
            hit.extend(packed_hit[offset:offset + n])
            offset += n
        yield i, TokenScores(np.asarray(lp, dtype=np.float32), np.asarray(hit, dtype=bool))


@torch.no_grad()
def _full_passes(model, encoded, pad_token_id, device, batch_size, report):
    by_id = {}
    keyed = [EncodedSample(str(k), e.input_ids, e.answer_mask, e.question_mask)
             for k, e in enumerate(encoded)]
    done = 0
    for batch in batches(keyed, batch_size, pad_token_id):
        out = answer_logits(model, batch.to(device))
        logp = out.token_logprobs().cpu().numpy()
        hit = out.correct().cpu().numpy()
        rows = out.rows.cpu().numpy()
        for r, key in enumerate(batch.ids):
            by_id[int(key)] = TokenScores(logp[rows == r].astype(np.float32), hit[rows == r])
        done += len(batch)
        report(done, len(encoded))
    return [by_id[k] for k in range(len(encoded))]
