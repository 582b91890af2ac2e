"""Property: whatever rows a data file holds, the loader returns valid samples or raises a
DataError naming the file; never another exception."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cud.data import load_qa
from cud.errors import DataError

FIELDS = ("id", "question", "answer", "paraphrased_answer", "data")

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
rows = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=5),
    st.fixed_dictionaries({"question": st.text(max_size=30), "answer": st.text(max_size=30)},
                          optional={"id": st.one_of(st.text(max_size=8), st.integers(0, 5))}),
    values,
)
garbage_lines = st.text(max_size=40)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _check(path: Path, n_rows: int | None = None) -> None:
    try:
        samples = load_qa(path)
    except DataError as e:
        assert str(path) in str(e)  # the message names the file
        return
    ids = [s.id for s in samples]
    assert len(set(ids)) == len(ids)
    for s in samples:
        assert isinstance(s.question, str) and s.question.strip()
        assert isinstance(s.answer, str) and s.answer.strip()
        assert isinstance(s.id, str)
    if n_rows is not None:
        assert len(samples) == n_rows


def _write(suffix: str, data: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="cud-prop-"))
    path = folder / f"rows{suffix}"
    path.write_bytes(data)
    return path


@SETTINGS
@given(st.lists(st.one_of(rows.map(lambda r: json.dumps(r, ensure_ascii=False)),
                          garbage_lines), max_size=6))
@example(['{"question": "q?", "answer": "a", "id": ' + "9" * 5000 + "}"])
@example(["[" * 50_000])
def test_json_lines(lines):
    _check(_write(".jsonl", "\n".join(lines).encode()))


@SETTINGS
@given(st.lists(rows, max_size=6))
def test_json_array(items):
    _check(_write(".json", json.dumps(items, ensure_ascii=False, indent=1).encode()))


@SETTINGS
@given(st.lists(st.fixed_dictionaries({"question": st.text(min_size=1, max_size=20)
                                       .filter(str.strip),
                                       "answer": st.text(min_size=1, max_size=20)
                                       .filter(str.strip)}), min_size=1, max_size=6))
@example([{"question": "line\u2028separator?", "answer": "a\rb \"quoted\", c"}])
def test_valid_rows_all_load(items):
    """Every well-formed row is a sample (questions and answers with any characters,
    U+2028 and quotes included), in JSON Lines and CSV alike."""
    _check(_write(".jsonl", "\n".join(json.dumps(r, ensure_ascii=False)
                                     for r in items).encode()), n_rows=len(items))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["question", "answer"])
    writer.writeheader()
    writer.writerows(items)
    _check(_write(".csv", buf.getvalue().encode()), n_rows=len(items))


@SETTINGS
@given(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True),
       st.lists(st.lists(st.text(max_size=15), max_size=5), max_size=5))
def test_csv(header, cells):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(cells)
    _check(_write(".csv", buf.getvalue().encode()))


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_raw_bytes(data, suffix):
    _check(_write(suffix, data))
