"""The Typer app every command registers on, the console and the one-line error."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Circuit-guided Unlearning Difficulty: which samples will be hard to "
                       "unlearn, and why, before you unlearn.")
console = Console(stderr=True)


def fail(message: str) -> None:
    """Print a one-line error and exit non-zero."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)
