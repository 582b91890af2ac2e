"""The unit of data: one question-answer sample (or one plain text) with a stable id."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class QASample:
    """One QA pair of a forget or retain set.

    ``source`` is where the row came from (``file:line``), kept so later errors can point at it.
    ``extra`` holds any other fields of the row (e.g. TOFU's paraphrased / perturbed answers).
    A plain text (MUSE, WMDP) is a sample with ``extra["kind"] == "text"``: ``question`` is its
    prefix (or empty: split in tokens when encoded) and ``answer`` the rest (:mod:`cud.data.text`).
    """

    id: str
    question: str
    answer: str
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def identity(self) -> str:
        """What makes two samples the same sample for every cache and resumable folder: id,
        question and answer, and for a text the settings that split it into tokens
        (:class:`cud.data.text.TextSettings`), so other settings never reuse its results."""
        parts: list = [self.id, self.question, self.answer]
        settings = self.extra.get("text_settings")
        if settings is not None:
            parts.append(dataclasses.asdict(settings) if dataclasses.is_dataclass(settings)
                         else settings)
        return json.dumps(parts)
