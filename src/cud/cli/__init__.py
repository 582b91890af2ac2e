"""The ``cud`` command line: one Typer app, each command a thin shell over the library.

Errors a user can act on (:class:`cud.errors.CudError`) are printed on one line and the process
exits with status 2; nothing else here computes anything. One module per stage registers its
commands on :data:`app`.
"""

from __future__ import annotations

import sys
from typing import Optional

from cud.cli.app import app, console, fail
from cud.errors import CudError

from cud.cli import analysis, circuits, difficulty, run, unlearning  # noqa: F401,E402  (register the commands)

__all__ = ["app", "main", "fail", "console"]


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``cud`` console script."""
    try:
        app(args=argv, standalone_mode=True)
    except CudError as e:  # raised outside a command body (e.g. while parsing)
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
