"""The ``cud`` command line: one Typer app, each command a thin shell over one library function
(listed in pipeline order: the main job first, then its stages).

Errors follow :mod:`cud.cli.app`'s policy: one ``error: ...`` line and a non-zero exit, never a
traceback. The command line runs offline: the hub's offline switches are set here, before
anything imports the hub client, so not even a name lookup leaves the machine.
"""

from __future__ import annotations

import os

for _switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_switch] = "1"

import sys  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402

from cud.cli.app import (CLICK_EXCEPTION, USAGE_ERROR, app, console, error_line,  # noqa: E402
                         fail, one_line_errors)
from cud.errors import CudError  # noqa: E402
from cud.runtime.memory import retain_freed_memory  # noqa: E402

# registration order is the order of `cud --help`: the main job, then the pipeline's stages
from cud.cli import run  # noqa: E402,F401
from cud.cli import finetune  # noqa: E402,F401
from cud.cli import circuits  # noqa: E402,F401
from cud.cli import unlearning  # noqa: E402,F401
from cud.cli import pilot  # noqa: E402,F401
from cud.cli import baselines  # noqa: E402,F401
from cud.cli import difficulty  # noqa: E402,F401
from cud.cli import analysis  # noqa: E402,F401
from cud.cli import report  # noqa: E402,F401

__all__ = ["app", "main", "fail", "console"]


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``cud`` console script. Usage errors (a bad option value, an unknown
    option) are one line too, naming the command, instead of click's multi-line box."""
    retain_freed_memory()  # fewer page faults in long CPU runs (cud.runtime.memory)
    code = 0
    try:
        with one_line_errors():
            code = app(args=argv, prog_name="cud", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _error("interrupted", code=130)
    except USAGE_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            print(e.ctx.get_help())
            sys.exit(0)
        where = e.ctx.command_path if e.ctx is not None else "cud"
        _error(f"{where}: {' '.join(e.format_message().split())} (see {where} --help)")
    except CLICK_EXCEPTION as e:
        _error(" ".join(e.format_message().split()), code=e.exit_code)
    except CudError as e:  # pragma: no cover - one_line_errors turns these into Exit
        _error(str(e))
    sys.exit(code if isinstance(code, int) else 0)


def _error(message: str, code: int = 2) -> None:
    error_line(message)
    sys.exit(code)


if __name__ == "__main__":
    main()
