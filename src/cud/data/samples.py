"""The unit of data: one question-answer sample with a stable id."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QASample:
    """One QA pair of a forget or retain set.

    ``source`` is where the row came from (``file:line``), kept so later errors can point at it.
    ``extra`` holds any other fields of the row (e.g. TOFU's paraphrased / perturbed answers).
    """

    id: str
    question: str
    answer: str
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
