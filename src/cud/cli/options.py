"""Reading the command line into the library's settings objects: each command's options default
to None and only the options given replace a setting, so every default stays stated once, in
its settings class (help texts quote it from there)."""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

from cud.errors import ConfigError, DataError

T = TypeVar("T")


def default(settings_class: type, name: str) -> str:
    """``(default: X)`` for a help text, X read from the settings class."""
    value = getattr(settings_class(), name)
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f"(default: {value})"


def settings_from(settings_class: type[T], base: T | None = None, **options: Any) -> T:
    """``base`` (default: the class's defaults) with every option that was given (not None)."""
    names = {f.name for f in fields(settings_class)}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:  # pragma: no cover - a programming error in a command
        raise TypeError(f"{settings_class.__name__} has no field(s) {unknown}")
    try:
        return replace(base if base is not None else settings_class(), **given)
    except ConfigError as e:  # name the option, not the field: "--batch-size must be ..."
        message = str(e)
        for name in sorted(names, key=len, reverse=True):
            if re.match(rf"{name}\b", message):
                message = "--" + name.replace("_", "-") + message[len(name):]
                break
        raise ConfigError(message) from None


def csv_list(spec: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; None stays None."""
    if spec is None:
        return None
    return [x.strip() for x in spec.split(",") if x.strip()]


def int_list(spec: str | None, option: str) -> tuple[int, ...] | None:
    if spec is None:
        return None
    try:
        return tuple(int(x) for x in csv_list(spec))
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated whole numbers, got '{spec}'") \
            from None


def float_list(spec: str | None, option: str) -> tuple[float, ...] | None:
    if spec is None:
        return None
    try:
        return tuple(float(x) for x in csv_list(spec))
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated numbers, got '{spec}'") from None


def id_list(spec: str) -> list[str]:
    """A file (one id per line, or a JSON list) or a comma-separated list of ids."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text()
        if path.suffix == ".json":
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"not JSON ({e.msg})", file=str(path), line=e.lineno) from None
            if not isinstance(values, list):
                raise DataError("expected a JSON list of sample ids", file=str(path))
            return [str(v) for v in values]
        return [line.strip() for line in text.splitlines() if line.strip()]
    return csv_list(spec) or []


def ids_or_file(spec: str | None, option: str) -> list[str] | None:
    """``@FILE``: the ids in FILE, one a line, verbatim (an id may hold commas and spaces;
    empty lines are skipped); otherwise a comma-separated list. None stays None."""
    if spec is None:
        return None
    if not spec.startswith("@"):
        return csv_list(spec)
    path = Path(spec[1:])
    if not path.is_file():
        raise DataError(f"no such file of ids for {option}", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", file=str(path)) from None
    ids = [line.removesuffix("\r") for line in text.split("\n")]
    ids = [i for i in ids if i]
    if not ids:
        raise DataError(f"no ids in the file for {option}", file=str(path))
    return ids


def parse_params(params: list[str]) -> dict:
    """``["alpha=2", "beta=none"]`` -> ``{"alpha": 2, "beta": None}``."""
    out = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param expects NAME=VALUE, got '{item}'")
        try:
            out[key] = None if value.lower() == "none" else \
                int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ConfigError(f"--param {key}: expected a number, got '{value}'") from None
    return out


def out_folder(out: str, option: str = "--out", inputs: dict | None = None,
               writes: tuple[str, ...] = ()) -> Path:
    """An output folder option: never empty (an empty path would mean the current folder),
    never one of the command's ``inputs`` (``{option: path}``) nor holding one where the
    command writes (``writes``; :func:`cud.folders.check_out`)."""
    if not str(out).strip():
        raise ConfigError(f"{option} is empty; give the folder to write into")
    if inputs:
        from cud.folders import check_out
        check_out(out, inputs, option, writes)
    return Path(out)


def workers_option(what: str):
    """``--workers``: Ray workers to shard ``what`` over (checked by :func:`distributed`)."""
    import typer
    return typer.Option(1, help=f"Ray workers to shard the {what} over (1: this process; needs "
                                "the ray extra, pip install 'cud\\[ray]', otherwise).")


def ray_address_option():
    import typer
    return typer.Option(None, help="Ray cluster to run on ('auto', 'ray://host:10001'); OUT "
                                   "must be on storage every node shares.")


def prefix_tokens_option():
    """``--prefix-tokens``: tokens of a plain text given as its prompt (:mod:`cud.data.text`)."""
    import typer

    from cud.data.text import TextSettings
    return typer.Option(None, help="Plain-text data: tokens of each text given as its prompt, "
                                   "the rest is forgotten; a text of at most that many tokens "
                                   "gets the first half of its tokens "
                                   f"{default(TextSettings, 'prefix_tokens')}.")


def max_tokens_option():
    """``--max-tokens``: the longest a plain text may be, in tokens (:mod:`cud.data.text`)."""
    import typer

    from cud.data.text import TextSettings
    return typer.Option(None, help="Plain-text data: longer texts are cut to this many tokens "
                                   f"{default(TextSettings, 'max_tokens')}.")


def text_settings(prefix_tokens: int | None, max_tokens: int | None):
    """The :class:`cud.data.text.TextSettings` of ``--prefix-tokens`` and ``--max-tokens``."""
    from cud.data.text import TextSettings
    return settings_from(TextSettings, prefix_tokens=prefix_tokens, max_tokens=max_tokens)


def distributed(workers: int, ray_address: str | None) -> bool:
    """Whether the work goes to Ray; refuses a worker count below 1."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    return workers > 1 or ray_address is not None
