"""What the commands show: rich progress bars drawn from the library's one progress callback
(:mod:`cud.progress`), and the small tables and lists every command prints."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

from cud.cli.app import console
from cud.progress import Progress


@contextlib.contextmanager
def progress_bars(transient: bool = True) -> Iterator[Progress]:
    """A :data:`cud.progress.Progress` callback drawing one bar per task, for the block."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars

    with Bars(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
              TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
              transient=transient) as bars:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int | None = None, info: str = "") -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task[:14], total=total, info="")
            bars.update(tasks[task], completed=done, total=total, info=str(info)[:60])

        yield update


def fmt_ci(value, lo, hi) -> str:
    """``+0.42 [+0.10, +0.66]``; ``–`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{value:+.2f}"
    return f"{value:+.2f} [{lo:+.2f}, {hi:+.2f}]"

