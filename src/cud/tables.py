"""Per-sample tables on disk: every result table of cud is written twice, as Parquet (typed,
for programs) and CSV (for people), under one path without suffix; readers take either and
give back a table indexed by sample ``id``. Files are written to a temporary name and renamed
into place, so a killed run never leaves half a table behind.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from cud.errors import DataError, StoreError
from cud.folders import replacing


def write_csv(table: pd.DataFrame, path: str | Path, *, index: bool = True) -> None:
    """``table`` as CSV that reads back the same (:func:`read_csv`): every text cell quoted, so
    a value with a comma, quote, tab, newline or carriage return stays one cell of one row (the
    header, the column names, is quoted only where it needs to be, as before)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        table.head(0).to_csv(f, index=index)
        table.to_csv(f, index=index, header=False, quoting=csv.QUOTE_NONNUMERIC)


def read_csv(path: str | Path, **kwargs) -> pd.DataFrame:
    """A CSV file as :func:`write_csv` writes it (any other CSV too); an ``id`` column is read
    as text, verbatim (``NA``, ``001`` and the empty id stay what they were)."""
    table = pd.read_csv(path, **kwargs)
    if "id" in table.columns:
        table["id"] = pd.read_csv(path, usecols=["id"], dtype=str, keep_default_na=False,
                                  **{k: v for k, v in kwargs.items() if k != "index_col"}
                                  )["id"].to_numpy()
    return table


def save_table(table: pd.DataFrame, path: str | Path, *, index: bool | None = None
               ) -> tuple[Path, Path]:
    """Write ``table`` as ``<path>.parquet`` and ``<path>.csv`` (a suffix on ``path`` is
    ignored). ``index``: write the index as a column (default: when it is named, e.g. ``id``).
    Returns the two paths."""
    path = Path(path)
    if path.suffix in (".parquet", ".csv"):
        path = path.with_suffix("")
    keep_index = table.index.name is not None if index is None else index
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        parquet, text = path.with_suffix(".parquet"), path.with_suffix(".csv")
        for target, write in ((parquet, lambda p: table.to_parquet(p, index=keep_index)),
                              (text, lambda p: write_csv(table, p, index=keep_index))):
            with replacing(target) as tmp:
                write(tmp)
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot write {path.name} ({e.strerror or e})") from None
    return parquet, text


def read_table(path: str | Path, *, what: str = "table", names: tuple[str, ...] = ()
               ) -> pd.DataFrame:
    """A ``.parquet`` or ``.csv`` table, or in a folder the first ``<name>.parquet`` / ``.csv``
    of ``names``; indexed by ``id`` (from a column ``id`` or the stored index), as strings."""
    path = Path(path)
    if path.is_dir():
        found = [path / f"{n}{ext}" for n in names for ext in (".parquet", ".csv")
                 if (path / f"{n}{ext}").is_file()]
        if not found:
            raise DataError(f"no {what} table inside (looked for "
                            f"{', '.join(n + '.parquet/.csv' for n in names)})", file=str(path))
        path = found[0]
    if not path.is_file():
        raise DataError(f"no such {what} file", file=str(path))
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else read_csv(path)
    except Exception as e:  # pyarrow and pandas raise many types for a damaged file
        raise DataError(f"unreadable {what} table ({type(e).__name__}: {e})",
                        file=str(path)) from None
    if "id" in table.columns:
        table = table.set_index("id")
    elif table.index.name != "id":
        raise DataError(f"the {what} table has no 'id' column", file=str(path))
    table.index = table.index.astype(str)
    return table
