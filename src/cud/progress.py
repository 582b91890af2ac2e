"""The one progress callback every long computation of the library accepts.

The library never prints: a long stage calls ``progress(task, done, total, info)`` after each
unit of work, and whoever called it (the command line draws rich progress bars from these
calls) decides what to show. ``task`` names what is being counted ("circuits", "graddiff",
"mrd", ...), ``total`` is None while the size of the task is unknown, ``info`` is a short note
("loss 0.412", "12 already done").
"""

from __future__ import annotations

from typing import Callable, Optional

Progress = Callable[[str, int, Optional[int], str], None]


def silent(task: str, done: int, total: int | None = None, info: str = "") -> None:
    """A progress callback that shows nothing (the default of every function taking one)."""


def within(progress: Progress | None, task: str) -> Callable[[int, int | None, str], None]:
    """``progress`` bound to one task: a ``(done, total, info)`` callable, silent for None."""
    report = progress or silent
    return lambda done, total=None, info="": report(task, done, total, info)
