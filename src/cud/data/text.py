"""Plain-text samples (MUSE, WMDP corpora): a text split into a prefix, the prompt, and the
continuation to be forgotten.

Representation
    A text sample is a :class:`~cud.data.samples.QASample` with ``extra["kind"] == "text"``:
    the text is ``question + answer`` read as one string, verbatim. ``question`` is the prefix
    when the data gives it (fields ``prefix`` / ``continuation``), else empty and the whole text
    is in ``answer``. It is encoded WITHOUT the chat template (the prompt is the prefix itself,
    no added words; the tokenizer's own special tokens, e.g. BOS, are kept), so ``answer_mask``
    marks the continuation's tokens and ``question_mask`` the prefix's: every metric and loss
    reads the continuation only, and the ``corrupt`` ablation replaces the prefix. Nothing
    downstream of :func:`cud.data.encoding.encode_sample` knows about texts, except the outcome
    ROUGE-L (its reference is the continuation as encoded, :func:`continuation_text`) and the
    truth ratio (NaN: a text has no wrong answers, :func:`cud.data.prepare.has_perturbations`).

Default split: the first ``prefix_tokens`` = 32 tokens
    MUSE's verbatim-memorisation metric (VerbMem) prompts the model with the first l tokens of
    a forget-set text and scores the greedy continuation against the true continuation by
    ROUGE; the extraction literature (Carlini et al.) likewise uses a fixed number of prefix
    tokens. A fixed count, not a fraction, gives every text the same amount of context and
    makes the rest of the text, whatever its length, what is forgotten and measured. 32 tokens
    is short enough that most of a text is continuation (trained on and scored) and long enough
    to identify the passage. Explicit ``prefix`` / ``continuation`` fields override it per row.
    Set it with ``--prefix-tokens`` (every command that reads data) or ``[text] prefix_tokens``
    (`cud run`).

Short texts: the first half
    A text of at most ``prefix_tokens`` tokens would leave no continuation; such a text is
    split after the first :data:`SHORT_TEXT_PREFIX` (half) of its tokens instead (at least one
    token each side), so a set of short passages is usable without a per-row prefix. Longer
    texts are split as above, unchanged. A one-token text cannot be split and is refused.

The split is made when encoding, in the model's tokens
    The split and the window are counted in tokens of the model's tokenizer, and the window is
    bounded by the model's maximum positions: neither is known when a data file is read (every
    command, and ``cud run``, reads the data before it loads the model, and one file serves
    models with different tokenizers). Encoding is the one place every stage goes through with
    the tokenizer and the model's limit in hand, so the split is made there
    (:func:`tokenize_text`), deterministically. Storing a character split found with the
    tokenizer at load time would need the tokenizer at load time (``cud run`` reads its data
    before it has the model) and a second code path for data read without it. The sample keeps
    the text and the settings (``extra["text_settings"]``).

Long texts are cut, never silently
    A text longer than the window (``max_tokens`` = 512 tokens, special tokens and prefix
    included, and never more than the model's maximum positions) keeps its first window of
    tokens (``--max-tokens``, ``[text] max_tokens``). The library never prints: :func:`cut_notices` says, one line per data file, how many
    texts are cut and to what; the command line prints those lines when it loads the samples
    (:func:`cud.cli.common.say_text_cuts`).

Caches (fine-tuning, circuits, unlearning, baselines) key a text by its id, its text and its
:class:`TextSettings` (:meth:`~cud.data.samples.QASample.identity`): other settings are other
samples, never a reuse of old results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from cud.data.samples import QASample
from cud.errors import ConfigError, DataError
from cud.limits import check_count

#: ``extra["kind"]`` of a text sample
TEXT_KIND = "text"
#: the share of a short text's tokens (at most ``prefix_tokens``) given as its prefix
SHORT_TEXT_PREFIX = 0.5
#: the largest ``max_tokens`` (and so ``prefix_tokens``) a setting may ask for
MAX_TEXT_TOKENS = 1_000_000


@dataclass(frozen=True)
class TextSettings:
    """How text samples are split and cut (defaults: see the module docstring).

    ``prefix_tokens``: tokens of the text given as the prompt (when a row has no explicit
    ``prefix`` / ``continuation``; a text of at most that many tokens gets the first
    :data:`SHORT_TEXT_PREFIX` of its tokens); ``max_tokens``: the longest a text sample may be, in tokens,
    special tokens and prefix included (and never more than the model's maximum positions);
    longer texts are cut to it.
    """

    prefix_tokens: int = 32
    max_tokens: int = 512

    def __post_init__(self):
        try:
            for name in ("prefix_tokens", "max_tokens"):
                check_count(getattr(self, name), name, MAX_TEXT_TOKENS)
        except ConfigError as e:
            raise ConfigError(f"{e} (text settings)") from None
        if self.max_tokens <= self.prefix_tokens:
            raise ConfigError(f"max_tokens ({self.max_tokens}) must be more than "
                              f"prefix_tokens ({self.prefix_tokens}), to leave a continuation "
                              f"(text settings)")


DEFAULT_TEXT = TextSettings()


def is_text(sample: QASample) -> bool:
    """Whether ``sample`` is a plain text (rather than a question-answer pair)."""
    return sample.extra.get("kind") == TEXT_KIND


def text_sample(id: str, text: str, *, prefix: str | None = None, source: str = "",
                settings: TextSettings | None = None, extra: dict | None = None) -> QASample:
    """A text sample: ``text`` split after ``prefix`` (which ``text`` must begin with), or with
    ``prefix`` None after the first ``settings.prefix_tokens`` tokens when encoded."""
    if prefix is not None and (not prefix or not text.startswith(prefix)):
        raise ValueError("the prefix must be a non-empty beginning of the text")
    question = prefix or ""
    return QASample(id=id, question=question, answer=text[len(question):], source=source,
                    extra={**(extra or {}), "kind": TEXT_KIND,
                           "text_settings": settings or DEFAULT_TEXT})


def settings_of(sample: QASample) -> TextSettings:
    settings = sample.extra.get("text_settings")
    return settings if isinstance(settings, TextSettings) else DEFAULT_TEXT


def _where(sample: QASample) -> dict:
    file, _, line = sample.source.rpartition(":")
    return dict(file=file or sample.source or sample.id,
                line=int(line) if line.isdigit() else None)


@dataclass(frozen=True)
class TextTokens:
    """A text sample's tokens after the split and the cut (masks over ``input_ids``)."""

    input_ids: tuple[int, ...]
    answer_mask: tuple[bool, ...]    # the continuation's tokens
    question_mask: tuple[bool, ...]  # the prefix's tokens
    n_tokens: int                    # tokens of the whole text, before the cut
    window: int                      # the most tokens a text may have

    @property
    def cut(self) -> bool:
        return self.n_tokens > self.window


def window_of(sample: QASample, max_length: int | None = None) -> int:
    """The most tokens ``sample`` may have: its ``max_tokens``, at most ``max_length``."""
    limit = settings_of(sample).max_tokens
    return limit if max_length is None else min(limit, max_length)


def tokenize_text(tokenizer, sample: QASample, *, max_length: int | None = None) -> TextTokens:
    """Tokenise a text sample: the whole text at once, with the tokenizer's special tokens; the
    prefix is the text's first ``prefix_tokens`` tokens, or the tokens ending within an
    explicit prefix (``sample.question``); the continuation is every later token of the text;
    tokens past the window (:func:`window_of`) are cut.

    Raises :class:`DataError` naming the sample's file, line and field when no continuation
    token is left (a one-token text, an explicit prefix covering the whole text, or a prefix
    filling the window).
    """
    settings = settings_of(sample)
    where = _where(sample)
    full = sample.question + sample.answer
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(full, add_special_tokens=True, return_special_tokens_mask=True,
                    **({"return_offsets_mapping": True} if fast else {}))
    ids = list(enc["input_ids"])
    text_pos = [i for i, special in enumerate(enc["special_tokens_mask"]) if not special]
    if sample.question:  # explicit split: the tokens that end within the prefix
        field = "prefix"
        if fast:
            q_end = len(sample.question)
            offsets = enc["offset_mapping"]
            n_prefix = 0
            while n_prefix < len(text_pos) and offsets[text_pos[n_prefix]][1] <= q_end:
                n_prefix += 1
        else:  # no offsets: the prefix tokenised alone must begin the text's tokens
            p_ids = list(tokenizer(sample.question, add_special_tokens=False)["input_ids"])
            n_prefix = len(p_ids)
            if [ids[i] for i in text_pos[:n_prefix]] != p_ids:
                raise DataError("this tokenizer gives no character offsets and the prefix's "
                                "tokens cannot be located in the text; use the model's fast "
                                "tokenizer (tokenizer.json)", field=field, **where)
        if n_prefix == 0:
            raise DataError("the prefix has no token of its own (the text's first token runs "
                            "past it)", field=field, **where)
    else:
        field = "text"
        n_prefix = settings.prefix_tokens
        if 2 <= len(text_pos) <= n_prefix:  # a short text: the first part of its own tokens
            n_prefix = min(len(text_pos) - 1, max(1, round(len(text_pos) * SHORT_TEXT_PREFIX)))
    if len(text_pos) <= n_prefix:
        raise DataError(f"{len(text_pos)} tokens, none left for the continuation after the "
                        f"{n_prefix}-token prefix", field=field, **where)
    window = window_of(sample, max_length)
    if text_pos[n_prefix] >= window:
        raise DataError(f"the {n_prefix}-token prefix leaves no room for a continuation in "
                        f"the {window}-token window", field=field, **where)
    question_mask = [False] * len(ids)
    answer_mask = [False] * len(ids)
    for i in text_pos[:n_prefix]:
        question_mask[i] = True
    for i in text_pos[n_prefix:]:
        answer_mask[i] = True
    return TextTokens(tuple(ids[:window]), tuple(answer_mask[:window]),
                      tuple(question_mask[:window]), len(ids), window)


def continuation_text(tokenizer, sample: QASample, *, max_length: int | None = None) -> str:
    """The continuation of a text sample as encoded (after the split and the cut), decoded as
    greedy answers are: the reference of its ROUGE-L."""
    t = tokenize_text(tokenizer, sample, max_length=max_length)
    ids = [i for i, a in zip(t.input_ids, t.answer_mask) if a]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def cut_notices(samples: Sequence[QASample], tokenizer, *, max_length: int | None = None
                ) -> list[str]:
    """One line per data file (and window) whose texts are cut, e.g. ``12 texts of
    forget.jsonl cut to 512 tokens (the longest had 2310)``; empty when none is. Raises what
    :func:`tokenize_text` raises."""
    cuts: dict[tuple[str, int, bool], list[int]] = {}
    for s in samples:
        if not is_text(s):
            continue
        t = tokenize_text(tokenizer, s, max_length=max_length)
        if t.cut:
            by_model = t.window < settings_of(s).max_tokens
            cuts.setdefault((_where(s)["file"], t.window, by_model), []).append(t.n_tokens)
    lines = []
    for (file, window, by_model), lengths in cuts.items():
        n = len(lengths)
        limit = ", the model's maximum" if by_model else ""
        lines.append(f"{n} text{'s' if n > 1 else ''} of {file} cut to {window} tokens{limit} "
                     f"(the longest had {max(lengths)})")
    return lines
