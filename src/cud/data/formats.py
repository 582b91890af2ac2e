"""Reading QA sets from files: TOFU-style JSON / JSON Lines, CSV, Hugging Face datasets on disk,
and the built-in generator. Every invalid row raises :class:`DataError` naming file, line and field.

A row with ``question`` / ``answer`` is a QA pair; a row with ``text`` (and neither of those) is
a plain text (MUSE, WMDP), optionally with an explicit ``prefix`` and / or ``continuation``
(:mod:`cud.data.text`). One file holds one kind.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from cud.data.generator import fictitious_authors
from cud.data.samples import QASample
from cud.data.text import DEFAULT_TEXT, TEXT_KIND, TextSettings
from cud.errors import DataError

#: The default data of the main job.
BUILTIN = "builtin"
REQUIRED_FIELDS = ("question", "answer")
#: the fields of a text row: the text, and where it splits when the row says so
TEXT_FIELDS = ("text", "prefix", "continuation")


def load_qa(spec: str | Path, *, split: str | None = None, limit: int | None = None,
            text: TextSettings | None = None) -> list[QASample]:
    """Load a QA set (or a set of plain texts).

    ``spec`` is a path to a ``.json`` / ``.jsonl`` file (a JSON array or JSON Lines, one
    ``{"question", "answer", "id"?}`` object each), a ``.csv`` file with those columns, a folder
    written by ``datasets.Dataset.save_to_disk`` (``split`` picks a split of a ``DatasetDict``),
    or ``builtin[:N[:SEED]]`` for N generated fictitious-author facts (default 100, seed 0).
    Rows without an ``id`` get ``<file stem>-<row index>``. Duplicate ids are an error.

    Rows ``{"text", "id"?, "prefix"?, "continuation"?}`` instead are text samples
    (:mod:`cud.data.text`), split and cut when encoded as ``text`` says (default
    :class:`~cud.data.text.TextSettings`).
    """
    spec_str = str(spec)
    if split is not None and not Path(spec_str).is_dir():  # never silently ignored
        raise DataError(f"a split ('{split}') applies only to a dataset folder, not to "
                        f"{'built-in data' if spec_str.split(':')[0] == BUILTIN else 'a file'}",
                        file=spec_str)
    if spec_str == BUILTIN or spec_str.startswith(BUILTIN + ":"):
        samples = _builtin(spec_str)
    else:
        path = Path(spec_str)
        if not path.exists():
            raise DataError("no such file or folder", file=spec_str)
        if path.is_dir():
            samples = list(_rows_to_samples(_hf_disk_rows(path, split), path, text))
        elif path.suffix.lower() == ".csv":
            samples = list(_rows_to_samples(_csv_rows(path), path, text))
        elif path.suffix.lower() in (".json", ".jsonl", ".ndjson"):
            samples = list(_rows_to_samples(_json_rows(path), path, text))
        else:
            raise DataError("unknown data format (expected .json, .jsonl, .csv, a dataset "
                            "folder or 'builtin')", file=spec_str)
    if limit is not None:
        if limit < 1:  # a negative limit would silently drop samples from the end
            raise DataError(f"--limit must be at least 1, got {limit}", file=spec_str)
        samples = samples[:limit]
    if not samples:
        raise DataError("no samples", file=spec_str)
    return samples


def _builtin(spec: str) -> list[QASample]:
    parts = spec.split(":")[1:]
    try:
        n = int(parts[0]) if parts and parts[0] else 100
        seed = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise DataError(f"expected builtin[:N[:SEED]] with integers, got '{spec}'") from None
    if n < 1:
        raise DataError(f"builtin data needs N >= 1, got {n}")
    return fictitious_authors(n, seed=seed)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {e.start})", file=str(path), line=line) from None


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f" (column {e.colno})" if line is not None else ""
        raise DataError(f"malformed JSON: {e.msg}{at}", file=str(path),
                        line=line if line is not None else e.lineno) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"malformed JSON: {e}", file=str(path), line=line) from None
    except RecursionError:
        raise DataError("malformed JSON: nested too deeply", file=str(path), line=line) from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, row). A file holding one JSON array (or {"data": [...]}, or one
    object) or JSON Lines."""
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = _parse_json(text, path)
        if not isinstance(rows, list):  # pragma: no cover - a text starting with [ is a list
            raise DataError("expected a JSON array of objects", file=str(path))
        # Items of an array have no line of their own: report the item number instead.
        for i, row in enumerate(rows):
            yield i + 1, row
        return
    if stripped.startswith("{") and "\n" in stripped.rstrip():
        try:  # one pretty-printed object rather than JSON Lines
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            if isinstance(whole.get("data"), list) and \
                    not any(k in whole for k in REQUIRED_FIELDS):
                for i, item in enumerate(whole["data"]):
                    yield i + 1, item
            else:
                yield 1, whole
            return
    # JSON Lines end at "\n" only: str.splitlines would also cut at U+2028 and other
    # separators that JSON allows inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row = _parse_json(line, path, lineno)
        if isinstance(row, dict) and "data" in row and isinstance(row["data"], list) \
                and not any(k in row for k in REQUIRED_FIELDS):
            for i, item in enumerate(row["data"]):
                yield i + 1, item
            continue
        yield lineno, row


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    # newline="": quoted cells may hold line breaks (str.splitlines would cut them)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None:
            raise DataError("empty CSV file", file=str(path))
        twice = sorted({c for c in reader.fieldnames if reader.fieldnames.count(c) > 1})
        if twice:  # DictReader would keep the last of them silently
            raise DataError(f"column(s) {', '.join(map(repr, twice))} appear more than once in "
                            f"the header", file=str(path), line=1)
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError("more cells than columns in the header", file=str(path),
                                line=reader.line_num)
            yield reader.line_num, row
    except csv.Error as e:  # e.g. a cell over the field size limit
        raise DataError(f"malformed CSV: {e}", file=str(path), line=reader.line_num) from None


def _hf_disk_rows(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError("reading a dataset folder needs the 'datasets' package "
                        "(pip install 'cud[datasets]')", file=str(path)) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a folder that is not a dataset
        raise DataError(f"not a dataset saved with save_to_disk ({type(e).__name__})",
                        file=str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            if len(names) != 1:
                raise DataError(f"the dataset has splits {names}; choose one with --split",
                                file=str(path))
            split = names[0]
        if split not in ds:
            raise DataError(f"no split '{split}' (have {names})", file=str(path))
        ds = ds[split]
    for i, row in enumerate(ds):
        yield i + 1, row


def _check_answers(extra: dict, path: Path, line: int) -> None:
    """TOFU's other answers must be text (``paraphrased_answer``) and text or a list of texts
    (``perturbed_answer``): the truth ratio reads them as answers. An empty value counts as
    absent."""
    para = extra.get("paraphrased_answer")
    if para not in (None, "") and not isinstance(para, str):
        raise DataError(f"expected text, got {type(para).__name__}", file=str(path), line=line,
                        field="paraphrased_answer")
    pert = extra.get("perturbed_answer")
    if pert in (None, "", []):
        return
    items = [pert] if isinstance(pert, str) else pert
    if not isinstance(items, (list, tuple)) or \
            not all(isinstance(p, str) and p.strip() for p in items):
        raise DataError("expected a text or a list of non-empty texts, got "
                        f"{pert!r}"[:120], file=str(path), line=line, field="perturbed_answer")


def _present(value: Any) -> bool:
    """A field counts as given unless absent, null or an empty cell."""
    return value is not None and value != ""


def _row_kind(row: dict) -> str:
    """``"qa"`` for a row with a question or an answer, ``"text"`` for a row with a text (or a
    text field and no QA field), else ``"qa"`` (whose checks name the missing field)."""
    if any(_present(row.get(k)) for k in REQUIRED_FIELDS):
        return "qa"
    if _present(row.get("text")) or ("text" in row and not any(k in row for k in
                                                                REQUIRED_FIELDS)):
        return "text"
    return "qa"


def _text_field(row: dict, name: str, path: Path, line: int, *, required: bool) -> str | None:
    value = row.get(name)
    if not required and not _present(value):  # an empty cell is an absent field
        return None
    if value is None:
        raise DataError("missing", file=str(path), line=line, field=name)
    if not isinstance(value, str):
        raise DataError(f"expected text, got {type(value).__name__}", file=str(path),
                        line=line, field=name)
    if not value.strip():
        raise DataError("empty", file=str(path), line=line, field=name)
    return value


def _text_prefix(row: dict, path: Path, line: int) -> tuple[str, str]:
    """(prefix, rest) of a text row: the rest is what follows the prefix in the text; with no
    ``prefix`` and no ``continuation`` the prefix is empty (split in tokens when encoded)."""
    text = _text_field(row, "text", path, line, required=True)
    prefix = _text_field(row, "prefix", path, line, required=False)
    cont = _text_field(row, "continuation", path, line, required=False)
    where = dict(file=str(path), line=line)
    if prefix is not None and not text.startswith(prefix):
        raise DataError("the text does not begin with the prefix", field="prefix", **where)
    if cont is not None and not text.endswith(cont):
        raise DataError("the text does not end with the continuation", field="continuation",
                        **where)
    if prefix is None and cont is None:
        return "", text
    if prefix is None:
        # the whitespace between the two goes with the continuation, as with a given prefix
        prefix = text[:len(text) - len(cont)].rstrip()
        if not prefix.strip():
            raise DataError("the continuation is the whole text: no prefix is left before it",
                            field="continuation", **where)
    rest = text[len(prefix):]
    if not rest.strip():
        raise DataError("the prefix is the whole text: nothing is left to forget",
                        field="prefix", **where)
    if cont is not None and (len(prefix) + len(cont) > len(text) or
                             text[len(prefix):len(text) - len(cont)].strip()):
        raise DataError("the text is not the prefix followed by the continuation",
                        field="continuation", **where)
    return prefix, rest


def _rows_to_samples(rows: Iterable[tuple[int, Any]], path: Path,
                     text: TextSettings | None = None) -> Iterator[QASample]:
    seen: dict[str, int] = {}
    first: tuple[str, int] | None = None  # (kind, line) of the file's first row
    for index, (line, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected an object with 'question' and 'answer', got "
                            f"{type(row).__name__}", file=str(path), line=line)
        kind = _row_kind(row)
        if first is None:
            first = (kind, line)
        elif kind != first[0]:
            this, other = ("a text", "QA pairs") if kind == "text" else ("a QA pair", "texts")
            raise DataError(f"{this} in a file of {other} (line {first[1]}); a file holds "
                            f"QA pairs or texts, not both", file=str(path), line=line,
                            field="text" if kind == "text" else "question")
        if kind == "qa":
            if not any(k in row for k in (*REQUIRED_FIELDS, "text")):
                raise DataError("missing (a row needs 'question' and 'answer', or 'text')",
                                file=str(path), line=line, field="question")
            for name in REQUIRED_FIELDS:
                value = row.get(name)
                if value is None:
                    raise DataError("missing", file=str(path), line=line, field=name)
                if not isinstance(value, str):
                    raise DataError(f"expected text, got {type(value).__name__}",
                                    file=str(path), line=line, field=name)
                if not value.strip():
                    raise DataError("empty", file=str(path), line=line, field=name)
            if row.get("kind") == TEXT_KIND:  # would be read as a text when encoded
                raise DataError(f"'{TEXT_KIND}' marks a text sample, not a QA pair",
                                file=str(path), line=line, field="kind")
        else:
            prefix, rest = _text_prefix(row, path, line)
        raw_id = row.get("id")
        if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
            sample_id = f"{path.stem}-{index:05d}"
        elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
            sample_id = str(raw_id)
        else:
            raise DataError(f"expected a string or integer, got {type(raw_id).__name__}",
                            file=str(path), line=line, field="id")
        if sample_id in seen:
            raise DataError(f"duplicate id '{sample_id}' (first at line {seen[sample_id]})",
                            file=str(path), line=line, field="id")
        seen[sample_id] = line
        if kind == "text":
            extra = {k: v for k, v in row.items() if k not in ("id", *TEXT_FIELDS)}
            extra.update(kind=TEXT_KIND, text_settings=text or DEFAULT_TEXT)
            yield QASample(id=sample_id, question=prefix, answer=rest,
                           source=f"{path}:{line}", extra=extra)
            continue
        extra = {k: v for k, v in row.items() if k not in ("id", *REQUIRED_FIELDS)}
        _check_answers(extra, path, line)
        yield QASample(id=sample_id, question=row["question"], answer=row["answer"],
                       source=f"{path}:{line}", extra=extra)
