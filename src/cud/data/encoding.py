"""From QA samples to token ids: the chat template (when the tokenizer has one), a mask of the
answer tokens (the only tokens every metric reads), a mask of the question tokens (what the
``corrupt`` baseline replaces), and right-padded batches. Text samples (``extra["kind"] ==
"text"``) are encoded without the template, split into prefix and continuation in the model's
tokens and cut to a window (:mod:`cud.data.text`).

Right padding keeps every real token at the position it has when the sample runs alone, so a
batched run computes exactly what one-sample-at-a-time runs compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cud.data.samples import QASample
from cud.data.text import is_text, tokenize_text
from cud.errors import DataError, ModelError

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class EncodedSample:
    """One tokenised sample. Masks are over the token positions of ``input_ids``."""

    id: str
    input_ids: tuple[int, ...]
    answer_mask: tuple[bool, ...]    # token belongs to the answer (a prediction target)
    question_mask: tuple[bool, ...]  # token belongs to the question text

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    """Right-padded tensors of a batch of samples. Shapes (B, T) unless noted."""

    ids: list[str]
    input_ids: torch.Tensor       # long
    attention_mask: torch.Tensor  # bool, True on real tokens
    answer_mask: torch.Tensor     # bool, True on answer tokens
    question_mask: torch.Tensor   # bool, True on question tokens
    #: (B,) float per-sample loss weights (the ``reweight`` strategy), None: every sample alike
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.ids, *(t.to(device) for t in (
            self.input_ids, self.attention_mask, self.answer_mask, self.question_mask)),
            weights=None if self.weights is None else self.weights.to(device))

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, T-1) bool: logits at position t predict token t+1; True where that is an answer token."""
        return self.answer_mask[:, 1:]


def format_prompt(tokenizer, question: str) -> tuple[str, bool]:
    """The prompt text for a question and whether the tokenizer should add its special tokens.

    With a chat template, the question is the user's turn and the generation prompt follows;
    the template already holds every special token it wants.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                 tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template is a program: it may raise anything (Jinja)
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelError(f"{name}: the tokenizer's chat template fails on a user turn "
                             f"({type(e).__name__}: {first[:200]}); fix chat_template in its "
                             f"tokenizer_config.json, or remove it to use a plain prompt"
                             ) from None
        if not isinstance(text, str):
            raise ModelError(f"{getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}: "
                             f"the chat template gave no text")
        return text, False
    return PLAIN_TEMPLATE.format(question=question), True


def _slow_question_mask(tokenizer, prompt: str, q_start: int, q_end: int, p_ids: list[int],
                        where: dict) -> list[bool]:
    """The question's tokens among a slow tokenizer's prompt tokens ``p_ids``: the prompt up to
    the question's start and up to its end, tokenised alone, must be prefixes of the prompt's
    own tokens (they are for byte- and word-level tokenizers); otherwise the question cannot be
    located and the sample is refused rather than given an empty mask (the corrupt ablation
    would then change nothing)."""
    def plain(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    body = plain(prompt)
    lead = next((k for k in range(len(p_ids) - len(body) + 1)
                 if p_ids[k:k + len(body)] == body), None)
    before, through = plain(prompt[:q_start]), plain(prompt[:q_end])
    if q_start < 0 or lead is None or body[:len(before)] != before or \
            body[:len(through)] != through or len(through) <= len(before):
        raise DataError("this tokenizer gives no character offsets and the question's tokens "
                        "cannot be located in the prompt; use the model's fast tokenizer "
                        "(tokenizer.json)", field="question", **where)
    mask = [False] * len(p_ids)
    for k in range(lead + len(before), lead + len(through)):
        mask[k] = True
    return mask


def encode_sample(tokenizer, sample: QASample, *, max_length: int | None = None
                  ) -> EncodedSample:
    """Tokenise ``sample`` as prompt + answer and mark answer and question tokens.

    Raises :class:`DataError` naming the sample's source when it has no answer token after
    tokenisation or is longer than ``max_length`` tokens. A text sample is encoded by
    :func:`cud.data.text.tokenize_text` instead: prompt = its prefix, answer = its
    continuation, cut (not refused) to its window and ``max_length``.
    """
    if is_text(sample):
        t = tokenize_text(tokenizer, sample, max_length=max_length)
        return EncodedSample(sample.id, t.input_ids, t.answer_mask, t.question_mask)
    prompt, add_special = format_prompt(tokenizer, sample.question)
    answer = sample.answer if prompt.endswith(("\n", " ")) else " " + sample.answer
    full = prompt + answer
    answer_start = len(prompt)
    q_start = prompt.rfind(sample.question)
    q_end = q_start + len(sample.question)
    file, _, line = sample.source.rpartition(":")
    where = dict(file=file or sample.source or sample.id,
                 line=int(line) if line.isdigit() else None)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        answer_mask = [end > answer_start and end > start for start, end in offsets]
        question_mask = [q_start >= 0 and start < q_end and end > q_start and end > start
                         for start, end in offsets]
    else:  # slow tokenizers have no offsets: tokenise the parts separately
        p_ids = list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = p_ids + list(a_ids)
        answer_mask = [False] * len(p_ids) + [True] * len(a_ids)
        question_mask = _slow_question_mask(tokenizer, prompt, q_start, q_end, p_ids, where) \
            + [False] * len(a_ids)
    if not any(answer_mask):
        raise DataError("the answer has no token after tokenisation", field="answer", **where)
    if answer_mask[0]:
        raise DataError("the prompt has no token before the answer", field="question", **where)
    if max_length is not None and len(ids) > max_length:
        field = "question" if sum(not a for a in answer_mask) > max_length else "answer"
        raise DataError(f"{len(ids)} tokens, longer than the model's {max_length}",
                        field=field, **where)
    return EncodedSample(sample.id, tuple(ids), tuple(answer_mask), tuple(question_mask))


def encode_samples(tokenizer, samples: Sequence[QASample], *, max_length: int | None = None
                   ) -> list[EncodedSample]:
    return [encode_sample(tokenizer, s, max_length=max_length) for s in samples]


def collate(encoded: Sequence[EncodedSample], pad_token_id: int = 0) -> Batch:
    """Right-pad a list of encoded samples into a :class:`Batch`."""
    if not encoded:
        raise ValueError("cannot collate an empty batch")
    t = max(len(e) for e in encoded)
    b = len(encoded)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.bool)
    answer = torch.zeros((b, t), dtype=torch.bool)
    question = torch.zeros((b, t), dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = True
        answer[i, :n] = torch.tensor(e.answer_mask)
        question[i, :n] = torch.tensor(e.question_mask)
    return Batch([e.id for e in encoded], input_ids, attention, answer, question)


def batches(encoded: Sequence[EncodedSample], batch_size: int, pad_token_id: int = 0,
            *, sort_by_length: bool = True) -> list[Batch]:
    """Split into batches; by default samples of similar length go together (less padding)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i])) if sort_by_length \
        else list(range(len(encoded)))
    return [collate([encoded[i] for i in order[k:k + batch_size]], pad_token_id)
            for k in range(0, len(order), batch_size)]
