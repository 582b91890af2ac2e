"""TOFU (Maini et al. 2024) from a local folder: ``tofu:FOLDER[:FORGET[:RETAIN]]``.

The folder holds TOFU's JSON Lines files as the dataset publishes them (``full.json``,
``forget01.json`` / ``forget05.json`` / ``forget10.json``, ``retain90.json`` / ``retain95.json``
/ ``retain99.json``, their ``*_perturbed.json`` versions with paraphrased and perturbed answers,
``retain_perturbed.json``, ``world_facts.json``, ``real_authors.json``), e.g. from
``huggingface-cli download locuslab/TOFU --repo-type dataset --local-dir FOLDER`` on a machine
with network access. Nothing is downloaded here.

Every TOFU author has 20 consecutive QA pairs in ``full.json``; the forget splits are its last
40 / 200 / 400 rows and the retain splits the rows before them. Samples get stable ids
``tofu_a{author:03d}.q{k:02d}`` (author index in ``full.json``, question k of that author), found
by the question's row in ``full.json`` when that file is present, else from the split's offset.
The author is the group a forget/retain split keeps together; ``extra["question_type"]`` is a
coarse topic of the question (name, birth, parents, genre, awards, books, ...), used to check
that a difficulty score is not only a question template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from cud.data.samples import QASample
from cud.errors import DataError

PREFIX = "tofu:"
DEFAULT_FORGET = "forget10"
DEFAULT_RETAIN = "retain90"
QUESTIONS_PER_AUTHOR = 20
N_FULL = 4000

#: (question type, pattern on the lower-cased question), first match wins
QUESTION_TYPES: tuple[tuple[str, str], ...] = (
    ("name", r"\b(full name|name of the author|called|pen name)\b"),
    ("parents", r"\b(father|mother|parents?'?|upbringing|family|grew up)\b"),
    ("birth", r"\b(born|birth|birthplace|date of birth|age)\b"),
    ("gender", r"\b(gender|identify|lgbtq)\b"),
    ("awards", r"\b(awards?|prizes?|honou?rs?|recognition|won)\b"),
    ("genre", r"\b(genre)\b"),
    ("influence", r"\b(influenc\w*|inspir\w*|impact\w*|shaped)\b"),
    ("books", r"\b(books?|novels?|works?|titles?|series|written|wrote|authored|publish\w*)\b"),
    ("style", r"\b(style|themes?|characters?|writing|narrative)\b"),
)


def question_type(question: str) -> str:
    """A coarse topic of a TOFU question (see :data:`QUESTION_TYPES`); ``other`` when none."""
    q = question.lower()
    for name, pattern in QUESTION_TYPES:
        if re.search(pattern, q):
            return name
    return "other"


def parse_spec(spec: str) -> tuple[Path, str, str]:
    """(folder, forget split, retain split) of ``tofu:FOLDER[:FORGET[:RETAIN]]``."""
    if not spec.startswith(PREFIX):
        raise DataError(f"not a TOFU spec (expected {PREFIX}FOLDER[:FORGET[:RETAIN]])", file=spec)
    parts = spec[len(PREFIX):].split(":")
    folder = Path(parts[0]).expanduser()
    forget = parts[1] if len(parts) > 1 and parts[1] else DEFAULT_FORGET
    retain = parts[2] if len(parts) > 2 and parts[2] else DEFAULT_RETAIN
    if len(parts) > 3:
        raise DataError(f"too many ':' parts (expected {PREFIX}FOLDER[:FORGET[:RETAIN]])",
                        file=spec)
    if not parts[0]:
        raise DataError(f"no folder (expected {PREFIX}FOLDER[:FORGET[:RETAIN]])", file=spec)
    if not folder.is_dir():
        raise DataError(f"no such TOFU folder (expected {PREFIX}FOLDER[:FORGET[:RETAIN]]; its "
                        f"files are TOFU's {DEFAULT_FORGET}.json, {DEFAULT_RETAIN}.json, ...)",
                        file=str(folder))
    return folder, forget, retain


def _split_file(folder: Path, split: str, *, perturbed: bool) -> Path:
    """``<split>_perturbed.json`` when asked for and present, else ``<split>.json``."""
    if perturbed and not split.endswith("_perturbed"):
        candidate = folder / f"{split}_perturbed.json"
        if candidate.is_file():
            return candidate
    path = folder / f"{split}.json"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.json"))
        raise DataError(f"no TOFU split '{split}' in this folder (have: {', '.join(have)})",
                        file=str(folder))
    return path


def _full_rows(folder: Path) -> dict[tuple[str, str], int]:
    """(question, answer) -> row of ``full.json`` (empty when the file is absent). TOFU asks
    some questions of more than one author ("What is the full name of the author?"), so the
    question alone does not name a row."""
    path = folder / "full.json"
    if not path.is_file():
        return {}
    rows: dict[tuple[str, str], int] = {}
    n = 0
    for k, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
        if line.strip():
            try:
                row = json.loads(line)
                rows.setdefault((row["question"], row["answer"]), n)
            except (ValueError, KeyError, TypeError):
                raise DataError("not TOFU's JSON Lines (each line an object with 'question' "
                                "and 'answer')", file=str(path), line=k + 1) from None
            n += 1
    return rows


def _offset(split: str, n_rows: int) -> int:
    """Row of a split's first sample in ``full.json`` when that file is absent: forget splits
    are its last rows, everything else its first."""
    return N_FULL - n_rows if split.startswith("forget") else 0


def with_tofu_ids(samples: Sequence[QASample], split: str,
                  rows: dict[tuple[str, str], int]
                  ) -> list[QASample]:
    """``samples`` of a TOFU split with ids ``tofu_a{author}.q{k}``, the author, and the
    question type in ``extra``."""
    from dataclasses import replace
    offset = _offset(split, len(samples))
    out, seen = [], {}
    for k, s in enumerate(samples):
        row = rows.get((s.question, s.answer), offset + k)
        author, index = divmod(row, QUESTIONS_PER_AUTHOR)
        sample_id = f"tofu_a{author:03d}.q{index:02d}"
        if sample_id in seen:  # a question asked twice in TOFU: keep the rows apart
            sample_id = f"{sample_id}.{k}"
        seen[sample_id] = k
        extra = dict(s.extra, author=f"a{author:03d}", question_type=question_type(s.question))
        out.append(replace(s, id=sample_id, extra=extra))
    return out


def load_tofu(spec: str, *, limit: int | None = None, retain_authors: int | None = None
              ) -> tuple[list[QASample], list[QASample]]:
    """(forget, retain) of a TOFU spec. The forget split's ``_perturbed`` file is read when
    present (paraphrased and perturbed answers for the truth ratio); ``retain_perturbed.json``
    supplies them for retain samples it holds. ``limit`` caps each set; ``retain_authors`` keeps
    the retain set's first N authors (20 questions each)."""
    from cud.data.formats import load_qa
    folder, forget_name, retain_name = parse_spec(spec)
    rows = _full_rows(folder)
    forget = with_tofu_ids(load_qa(_split_file(folder, forget_name, perturbed=True)),
                           forget_name, rows)
    retain = with_tofu_ids(load_qa(_split_file(folder, retain_name, perturbed=False)),
                           retain_name, rows)
    forget_ids = {s.id for s in forget}
    overlap = [s.id for s in retain if s.id in forget_ids]
    if overlap:
        raise DataError(f"the forget split '{forget_name}' and the retain split '{retain_name}' "
                        f"share {len(overlap)} question(s) (e.g. {overlap[0]}); choose disjoint "
                        f"splits", file=str(folder))
    if retain_authors is not None:
        if retain_authors < 1:
            raise DataError(f"retain_authors must be at least 1, got {retain_authors}",
                            file=str(folder))
        authors = list(dict.fromkeys(s.extra["author"] for s in retain))[:retain_authors]
        retain = [s for s in retain if s.extra["author"] in set(authors)]
    retain = _attach_perturbed(retain, folder)
    if limit is not None:
        forget, retain = forget[:limit], retain[:limit]
    return forget, retain


def _attach_perturbed(samples: list[QASample], folder: Path) -> list[QASample]:
    from dataclasses import replace
    from cud.data.formats import load_qa
    path = folder / "retain_perturbed.json"
    if not path.is_file() or all(s.extra.get("perturbed_answer") for s in samples):
        return samples
    extra = {s.question: s.extra for s in load_qa(path)}
    out = []
    for s in samples:
        found = extra.get(s.question)
        if found and not s.extra.get("perturbed_answer") and found.get("perturbed_answer"):
            s = replace(s, extra={**s.extra, **{k: found[k] for k in
                                                ("paraphrased_answer", "perturbed_answer")
                                                if k in found}})
        out.append(s)
    return out
