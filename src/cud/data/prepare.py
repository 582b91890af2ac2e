"""Preparing the data of a run: the forget and retain sets, and the wrong answers TOFU's truth
ratio needs when a data set has none.

- :func:`load_run_data`: a data spec -> forget set, retain set and what the model is taught;
- :func:`split_forget_retain`: a QA set split by author (all facts of an author on one side, as
  TOFU's forget splits are);
- :func:`add_perturbed_answers`: other samples' answers of the same kind as wrong answers.

Text samples (:mod:`cud.data.text`) pass through every function here: they are split by author
(their id's part before the first '.') like QA pairs, and get no wrong answers (they are not
QA; their truth ratio is NaN).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from cud.data.formats import load_qa
from cud.data.samples import QASample
from cud.data.text import TextSettings, is_text
from cud.data.tofu import PREFIX as TOFU_PREFIX
from cud.data.tofu import load_tofu
from cud.errors import ConfigError

#: share of the authors of a (non-TOFU) data set that form the forget set
DEFAULT_FORGET_FRACTION = 0.5


def author_of(sample: QASample) -> str:
    """The group a sample belongs to: the id's part before the first '.' (``author003`` of a
    built-in fact ``author003.pet``, ``tofu_a187`` of TOFU's ``tofu_a187.q05``)."""
    return sample.id.split(".", 1)[0]


def split_forget_retain(samples: Sequence[QASample],
                        forget_fraction: float = DEFAULT_FORGET_FRACTION, *, seed: int = 0,
                        group: Callable[[QASample], str] | None = None
                        ) -> tuple[list[QASample], list[QASample]]:
    """Split by group (default :func:`author_of`), so that all facts of an author fall on one
    side; a seeded shuffle of the groups picks ``forget_fraction`` of them to forget."""
    if not 0 < forget_fraction < 1:
        raise ConfigError(f"forget fraction must be in (0, 1), got {forget_fraction}")
    key = group or author_of
    groups = sorted({key(s) for s in samples})
    random.Random(seed).shuffle(groups)
    n_forget_groups = max(1, round(len(groups) * forget_fraction))
    if n_forget_groups >= len(groups):
        raise ConfigError("the split leaves no retain samples; lower the forget fraction")
    chosen = set(groups[:n_forget_groups])
    forget = [s for s in samples if key(s) in chosen]
    retain = [s for s in samples if key(s) not in chosen]
    return forget, retain


def has_perturbations(sample: QASample) -> bool:
    """Whether the sample carries wrong answers for the truth ratio (checked at load time to be
    text or a list of texts). Never for a text sample: it is not a question."""
    return not is_text(sample) and bool(sample.extra.get("perturbed_answer"))


def add_perturbed_answers(samples: Sequence[QASample], n: int = 3, *, seed: int = 0,
                          group: Callable[[QASample], str] | None = None) -> list[QASample]:
    """Give samples without TOFU's ``perturbed_answer`` field ``n`` wrong answers of the same kind.

    Wrong answers are other samples' answers from the same group (default: the part of the id
    after the last '.', i.e. the attribute of a built-in fact, so a birth year gets other birth
    years), topped up from any other answers when a group is too small. ``paraphrased_answer``
    defaults to the answer itself. Samples that already have perturbed answers are kept as they are,
    and so are text samples (no wrong answers are made up for a text, nor from one).
    """
    rng = random.Random(seed)
    key = group or (lambda s: s.id.rsplit(".", 1)[-1] if "." in s.id else "")
    by_group: dict[str, list[str]] = {}
    qa = [s for s in samples if not is_text(s)]
    for s in qa:
        by_group.setdefault(key(s), []).append(s.answer)
    everything = sorted({s.answer for s in qa})
    out = []
    for s in samples:
        if has_perturbations(s) or is_text(s):
            out.append(s)
            continue
        pool = sorted({a for a in by_group[key(s)] if a != s.answer})
        rng.shuffle(pool)
        if len(pool) < n:
            rest = [a for a in everything if a != s.answer and a not in pool]
            rng.shuffle(rest)
            pool += rest[:n - len(pool)]
        extra = dict(s.extra, perturbed_answer=pool[:n])
        extra.setdefault("paraphrased_answer", s.answer)
        out.append(replace(s, extra=extra))
    return out


def with_perturbations(samples: Sequence[QASample]) -> list[QASample]:
    """``samples`` themselves when any has perturbed answers, else with
    :func:`add_perturbed_answers` (the truth ratio needs wrong answers of the same kind)."""
    samples = list(samples)
    return samples if any(has_perturbations(s) for s in samples) else \
        add_perturbed_answers(samples)


def _no_split(spec: str, split: str | None) -> None:
    if split is not None:
        raise ConfigError(f"a split ('{split}') does not apply to TOFU data ({spec}): its "
                          f"splits are named in the spec, tofu:FOLDER:FORGET:RETAIN")


def load_samples(spec: str, *, split: str | None = None, limit: int | None = None,
                 text: TextSettings | None = None) -> list[QASample]:
    """One QA set (any spec :func:`cud.data.load_qa` reads, or the forget split of a TOFU
    spec), with wrong answers for the truth ratio (:func:`with_perturbations`). ``text``: how
    text samples are split and cut (:class:`cud.data.text.TextSettings`)."""
    if spec.startswith(TOFU_PREFIX):
        _no_split(spec, split)
        forget, _ = load_tofu(spec, limit=limit)
        return with_perturbations(forget)
    return with_perturbations(load_qa(spec, split=split, limit=limit, text=text))


@dataclass
class RunData:
    """The sets of a run: what is forgotten, what is retained, and what the model is taught
    first (both, in the data's own order, so that fine-tuning shares its cache with
    ``cud finetune --data`` on the same data)."""

    forget: list[QASample]
    retain: list[QASample]
    taught: list[QASample]


def load_run_data(spec: str, *, limit: int | None = None, retain_authors: int | None = None,
                  forget_fraction: float = DEFAULT_FORGET_FRACTION, seed: int = 0,
                  text: TextSettings | None = None) -> RunData:
    """The forget and retain sets of ``spec``.

    ``tofu:FOLDER[:FORGET[:RETAIN]]`` reads TOFU's splits (:mod:`cud.data.tofu`; ``limit`` caps
    each set, ``retain_authors`` keeps the retain split's first N authors). Any other spec is
    one QA set split by author into forget and retain (``forget_fraction`` of the authors,
    seeded); ``limit`` then caps the whole set before the split.
    """
    if spec.startswith(TOFU_PREFIX):
        forget, retain = load_tofu(spec, limit=limit, retain_authors=retain_authors)
        if not any(has_perturbations(s) for s in forget):
            forget = add_perturbed_answers(forget + retain)[:len(forget)]
        return RunData(forget, retain, forget + retain)
    if retain_authors is not None:
        raise ConfigError("retain_authors applies to TOFU data (tofu:FOLDER:FORGET:RETAIN)")
    samples = with_perturbations(load_qa(spec, limit=limit, text=text))
    forget, retain = split_forget_retain(samples, forget_fraction, seed=seed)
    return RunData(forget, retain, samples)


def check_disjoint(forget: Sequence[QASample], retain: Sequence[QASample], forget_spec: str,
                   retain_spec: str) -> None:
    """Refuse a forget set and a retain set that share samples, by id or by text (question
    and answer): a sample cannot be both forgotten and retained. Names how many and one."""
    from cud.errors import DataError
    ids = {s.id for s in forget}
    texts = {(s.question, s.answer): s.id for s in forget}
    same_id = [s.id for s in retain if s.id in ids]
    same_text = [(texts[(s.question, s.answer)], s.id) for s in retain
                 if (s.question, s.answer) in texts]
    problems = []
    if same_id:
        problems.append(f"{len(same_id)} sample(s) by id (e.g. {same_id[0]!r})")
    if same_text:
        f_id, r_id = same_text[0]
        example = repr(f_id) if f_id == r_id else f"{f_id!r} and {r_id!r}"
        problems.append(f"{len(same_text)} by text (e.g. {example})")
    if problems:
        raise DataError(f"the forget set and the retain set ({retain_spec}) share "
                        f"{' and '.join(problems)}; a sample cannot be both forgotten and "
                        f"retained", file=str(forget_spec))


def forget_and_retain(data: str, *, forget: str | None = None, split: str | None = None,
                      limit: int | None = None,
                      forget_fraction: float = DEFAULT_FORGET_FRACTION,
                      retain_authors: int | None = None, seed: int = 0,
                      text: TextSettings | None = None) -> RunData:
    """The sets of a stage command: ``forget`` (a file) and ``data`` as the retain set, or
    :func:`load_run_data` of ``data`` (split by author, or TOFU's splits)."""
    if forget is None:
        if data.startswith(TOFU_PREFIX):
            _no_split(data, split)
        if split is not None and not data.startswith(TOFU_PREFIX):
            samples = with_perturbations(load_qa(data, split=split, limit=limit, text=text))
            f, r = split_forget_retain(samples, forget_fraction, seed=seed)
            return RunData(f, r, samples)
        return load_run_data(data, limit=limit, retain_authors=retain_authors,
                             forget_fraction=forget_fraction, seed=seed, text=text)
    forget_set = load_qa(forget, text=text)
    retain_set = load_samples(data, split=split, limit=limit, text=text)
    check_disjoint(forget_set, retain_set, forget, data)
    if not any(has_perturbations(s) for s in forget_set):
        forget_set = add_perturbed_answers(forget_set + retain_set)[:len(forget_set)]
    return RunData(forget_set, retain_set, forget_set + retain_set)

