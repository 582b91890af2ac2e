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
from cud.runtime.memory import retain_freed_memory

from cud.cli import analysis, circuits, difficulty, run, unlearning  # noqa: F401,E402  (register the commands)

__all__ = ["app", "main", "fail", "console"]


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``cud`` console script. Usage errors (a bad option value, an unknown
    option) are one line too, naming the command, instead of click's multi-line box."""
    click = _click_exceptions()
    retain_freed_memory()  # fewer page faults in long CPU runs (cud.runtime.memory)
    try:
        code = app(args=argv, prog_name="cud", standalone_mode=False)
    except CudError as e:  # raised outside a command body (e.g. while parsing)
        _error(str(e))
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            print(e.ctx.get_help())
            sys.exit(0)
        where = e.ctx.command_path if e.ctx is not None else "cud"
        _error(f"{where}: {' '.join(e.format_message().split())} (see {where} --help)")
    except click.Abort:
        _error("interrupted", code=130)
    except click.ClickException as e:
        _error(" ".join(e.format_message().split()), code=e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _click_exceptions():
    """The click exception classes typer raises (recent typer vendors its own click)."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer that uses the click package
        from click import exceptions
    return exceptions


def _error(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    sys.exit(code)


if __name__ == "__main__":
    main()
