"""Errors a user can act on. The CLI prints ``str(error)`` on one line and exits non-zero."""

from __future__ import annotations


class CudError(Exception):
    """Base class of every error cud raises on purpose (bad input, missing files, ...)."""


class DataError(CudError):
    """A data file or row is invalid. Names the file, the line (or item) and the field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field = file, line, field
        where = []
        if file is not None:
            where.append(str(file) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelError(CudError):
    """A model cannot be found, loaded or understood."""


class ConfigError(CudError):
    """An option or configuration value is invalid."""


class StoreError(CudError):
    """An output folder cannot be used (not a folder, incompatible version, ...)."""


class NumericalError(CudError):
    """A computation produced NaN or infinite values (e.g. overflow in a low-precision dtype)."""


#: the most characters of a value an error message echoes
SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (``...`` after): a
    huge value (a YAML alias bomb, a pasted file) is named by its beginning, never echoed
    whole. Nested containers are abbreviated while the text is built (:mod:`reprlib`), so a
    deep or wide value costs no memory to show."""
    import reprlib
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit + 3
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = 8
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
