"""The ``cud`` command line: one Typer app, each command a thin shell over the library.

Errors a user can act on (:class:`cud.errors.CudError`) are printed on one line and the process
exits with status 2; nothing else here computes anything.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

from cud.errors import CudError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Circuit-guided Unlearning Difficulty: which samples will be hard to "
                       "unlearn, and why, before you unlearn.")
console = Console(stderr=True)


def fail(message: str) -> None:
    """Print a one-line error and exit non-zero."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


# --- circuits -------------------------------------------------------------------------------
# (the `circuits` command is defined in this section)


# --- fine-tuning, unlearning, baseline metrics ------------------------------------------------
# (the `finetune`, `unlearn` and `baselines` commands are defined in this section)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``cud`` console script."""
    try:
        app(args=argv, standalone_mode=True)
    except CudError as e:  # raised outside a command body (e.g. while parsing)
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
