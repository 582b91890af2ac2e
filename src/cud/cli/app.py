"""The Typer app every command registers on, the console, and the error policy: whatever goes
wrong inside a command ends in one ``error: ...`` line and a non-zero exit, never a traceback.

- an error the user can act on (:class:`cud.errors.CudError`: bad data, model, option, folder)
  is that error's message, exit 2;
- an operating-system error (a read-only or full disk, a missing permission) names the file
  and the reason, exit 2;
- Ctrl-C prints ``interrupted``, exit 130 (results committed so far stay);
- anything else is a bug: one line naming the error and the log file that holds the
  traceback, exit 1.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from cud.errors import CudError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Circuit-guided Unlearning Difficulty: which samples will be hard to "
                       "unlearn, and why, before you unlearn.")
console = Console(stderr=True)

#: the exception classes typer raises for bad usage, found from its public BadParameter (typer
#: vendors its own copy of click, whose module path is private)
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


#: the longest error line printed: a message that echoes a huge value somewhere no
#: :func:`cud.errors.shown` cut it is cut here, the one place errors are rendered
MAX_ERROR_CHARS = 1000


def error_line(message: str) -> None:
    text = str(message)
    if len(text) > 4 * MAX_ERROR_CHARS:  # split no more of a huge message than is shown
        text = text[:4 * MAX_ERROR_CHARS]
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "..."
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True, highlight=False,
                  markup=True)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit with ``code``."""
    error_line(message)
    raise typer.Exit(code)


def _log_dir() -> Path:
    root = os.environ.get("CUD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "cud") / "errors"


def write_error_log(error: BaseException) -> Path:
    """The traceback of ``error`` in a new log file; its path."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    name = f"cud-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (_log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(f"cud {' '.join(sys.argv[1:])}\n\n{text}")
            return path
        except OSError:
            continue
    return Path("(no writable folder for the log)")


def os_error_message(error: OSError) -> str:
    where = error.filename or ""
    reason = error.strerror or str(error)
    return f"{where}: {reason}" if where else reason


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """The error policy of the module docstring, around a command's body."""
    try:
        yield
    except (typer.Exit, typer.Abort, CLICK_EXCEPTION):
        raise
    except CudError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except OSError as e:
        fail(os_error_message(e))
    except Exception as e:  # a bug: one line, the traceback in a file
        log = write_error_log(e)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        fail(f"unexpected {type(e).__name__}: {first} (this is a bug in cud; the traceback is "
             f"in {log})", code=1)


def command(fn: Callable) -> Callable:
    """Register ``fn`` as a command of :data:`app`, under the error policy."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_line_errors():
            return fn(*args, **kwargs)
    app.command()(wrapper)
    return wrapper
