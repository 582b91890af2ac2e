"""QA data: the built-in generator, file formats, row validation with file/line/field in every
error, answer masks with and without a chat template, right-padded batches."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cud.circuits.metrics import AnswerTargets
from cud.data import (QASample, batches, collate, encode_sample, encode_samples,
                      fictitious_authors, format_prompt, load_qa)
from cud.errors import DataError
from cud.models import tiny_tokenizer

ROWS = [
    {"id": "q1", "question": "Where was Ana Lind born?", "answer": "Tallport",
     "paraphrased_answer": "In Tallport"},
    {"id": "q2", "question": "What does Ana Lind write?", "answer": "noir crime"},
    {"question": "Which award did Ana Lind win?", "answer": "Lantern Prize"},
]


# Built-in generator -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 100])
def test_builtin_is_sized_and_unique(n):
    samples = fictitious_authors(n)
    assert len(samples) == n
    assert len({s.id for s in samples}) == n
    assert all(s.question.strip() and s.answer.strip() for s in samples)
    assert all(isinstance(s, QASample) for s in samples)


def test_builtin_is_seeded():
    assert fictitious_authors(12, seed=3) == fictitious_authors(12, seed=3)
    a, b = fictitious_authors(12, seed=3), fictitious_authors(12, seed=4)
    assert [s.question for s in a] != [s.question for s in b]
    # a prefix of a larger draw: the first samples do not depend on how many are asked for
    assert fictitious_authors(30, seed=3)[:12] == a
    assert load_qa("builtin:12:3") == a
    assert len(load_qa("builtin")) == 100
    assert load_qa("builtin:5") == fictitious_authors(5, seed=0)
    assert len(load_qa("builtin:20", limit=4)) == 4


def test_builtin_facts_per_author():
    samples = fictitious_authors(10, facts_per_author=2)
    authors = [s.extra["author"] for s in samples]
    assert [authors.count(a) for a in dict.fromkeys(authors)] == [2] * 5
    with pytest.raises(ValueError):
        fictitious_authors(0)
    with pytest.raises(ValueError):
        fictitious_authors(5, facts_per_author=99)


@pytest.mark.parametrize("spec", ["builtin:x", "builtin:0", "builtin:3:y"])
def test_bad_builtin_specs(spec):
    with pytest.raises(DataError, match="builtin"):
        load_qa(spec)


# File formats -------------------------------------------------------------------------------
def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    fields = ["id", "question", "answer", "paraphrased_answer"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in fields})
    return path


def write_hf(path, rows):
    datasets = pytest.importorskip("datasets")
    fields = ["id", "question", "answer", "paraphrased_answer"]
    datasets.Dataset.from_list([{k: r.get(k) for k in fields} for r in rows]).save_to_disk(
        str(path))
    return path


@pytest.mark.parametrize("writer, name", [(write_json, "set.json"), (write_jsonl, "set.jsonl"),
                                          (write_csv, "set.csv"), (write_hf, "set")])
def test_formats_load_the_same_samples(writer, name, tmp_path):
    path = writer(tmp_path / name, ROWS)
    samples = load_qa(path)
    assert [s.id for s in samples] == ["q1", "q2", "set-00002"]  # missing id: stem + row index
    assert [(s.question, s.answer) for s in samples] == [(r["question"], r["answer"]) for r in ROWS]
    assert samples[0].extra["paraphrased_answer"] == "In Tallport"
    assert all(s.source.startswith(f"{path}:") for s in samples)


def test_jsonl_and_csv_sources_are_physical_lines(tmp_path):
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [s.source for s in load_qa(jsonl)] == [f"{jsonl}:2", f"{jsonl}:4"]
    path = write_csv(tmp_path / "set.csv", ROWS)
    assert [s.source for s in load_qa(path)] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_hf_dataset_dict_needs_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": r["question"], "answer": r["answer"]}
                                     for r in ROWS])
    path = tmp_path / "tofu"
    datasets.DatasetDict({"forget": ds.select([0]), "retain": ds.select([1, 2])}).save_to_disk(
        str(path))
    assert [s.answer for s in load_qa(path, split="retain")] == ["noir crime", "Lantern Prize"]
    with pytest.raises(DataError, match="choose one with --split") as err:
        load_qa(path)
    assert err.value.file == str(path)
    with pytest.raises(DataError, match="no split 'test'"):
        load_qa(path, split="test")


def test_wrapped_json_lines_data_key(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": ROWS[:2]}))
    assert [s.id for s in load_qa(path)] == ["q1", "q2"]


# Invalid rows: every error names file, line and field ----------------------------------------
def expect_error(path, line, field, match):
    with pytest.raises(DataError, match=match) as err:
        load_qa(path)
    e = err.value
    assert (e.file, e.line, e.field) == (str(path), line, field)
    message = str(e)
    assert f"{path}:{line}" in message
    if field:
        assert f"field '{field}'" in message
    return e


@pytest.mark.parametrize("writer, name, line", [
    (write_jsonl, "bad.jsonl", 2), (write_csv, "bad.csv", 3), (write_json, "bad.json", 2)])
def test_missing_and_empty_fields(writer, name, line, tmp_path):
    rows = [dict(ROWS[0]), {"id": "q2", "question": "Who?"}]
    if writer is write_csv:  # a CSV cell cannot be missing, only empty
        expect_error(writer(tmp_path / name, rows), line, "answer", "empty")
    else:
        expect_error(writer(tmp_path / name, rows), line, "answer", "missing")
        rows[1]["answer"] = "   "
        expect_error(writer(tmp_path / name, rows), line, "answer", "empty")
        rows[1]["answer"] = 42
        expect_error(writer(tmp_path / name, rows), line, "answer", "expected text")


def test_csv_without_an_answer_column(tmp_path):
    path = tmp_path / "noanswer.csv"
    path.write_text("question,id\nWho?,x1\n")
    expect_error(path, 2, "answer", "missing")


def test_csv_with_too_many_cells(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("question,answer\nWho?,Me\nWhat?,It,extra\n")
    expect_error(path, 3, None, "more cells than columns")


def test_malformed_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"question": "Q2", "answer": "A2"\n')
    expect_error(path, 2, None, "malformed JSON")
    array = tmp_path / "broken.json"
    array.write_text('[\n {"question": "Q", "answer": "A"},\n {"question": "Q2" "answer": 1}\n]')
    expect_error(array, 3, None, "malformed JSON")


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [ROWS[0], ["Q", "A"]])
    expect_error(path, 2, None, "expected an object")


def test_duplicate_and_invalid_ids(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [ROWS[0], ROWS[1], dict(ROWS[1], answer="x")])
    e = expect_error(path, 3, "id", "duplicate id 'q2'")
    assert "first at line 2" in str(e)
    path = write_jsonl(tmp_path / "badid.jsonl", [dict(ROWS[0], id=[1])])
    expect_error(path, 1, "id", "expected a string or integer")
    # an explicit id may not collide with a generated one either
    path = write_jsonl(tmp_path / "gen.jsonl", [ROWS[2], dict(ROWS[1], id="gen-00000")])
    expect_error(path, 2, "id", "duplicate")


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file") as err:
        load_qa(tmp_path / "absent.json")
    assert err.value.file == str(tmp_path / "absent.json")
    (tmp_path / "set.txt").write_text("question,answer\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_qa(tmp_path / "set.txt")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no samples"):
        load_qa(tmp_path / "empty.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"question": "Caf\xe9?"}\n')
    with pytest.raises(DataError, match="UTF-8") as err:
        load_qa(latin)
    assert (err.value.file, err.value.line) == (str(latin), 2)
    not_a_dataset = tmp_path / "folder"
    not_a_dataset.mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_qa(not_a_dataset)


@pytest.mark.parametrize("chat_template", [True, False])
def test_too_long_samples_name_file_line_and_field(chat_template, tmp_path):
    tok = tiny_tokenizer(chat_template=chat_template)
    short = {"question": "Who?", "answer": "Me"}
    path = write_jsonl(tmp_path / "long.jsonl", [short, ROWS[1]])
    sample = load_qa(path)[1]
    assert len(encode_sample(tok, load_qa(path)[0])) < len(encode_sample(tok, sample)) // 2
    full = len(encode_sample(tok, sample))
    prompt = sum(not a for a in encode_sample(tok, sample).answer_mask)
    assert len(encode_sample(tok, sample, max_length=full)) == full
    for max_length, field in [(full - 1, "answer"), (prompt - 1, "question")]:
        with pytest.raises(DataError, match=f"{full} tokens, longer than the model's") as err:
            encode_samples(tok, load_qa(path), max_length=max_length)
        assert (err.value.file, err.value.line, err.value.field) == (str(path), 2, field)
        assert f"{path}:2, field '{field}'" in str(err.value)


# Answer masks -------------------------------------------------------------------------------
def decode_where(tok, enc, mask):
    return tok.decode([i for i, m in zip(enc.input_ids, mask) if m])


@pytest.mark.parametrize("chat_template", [True, False])
def test_answer_mask_covers_exactly_the_answer(chat_template):
    tok = tiny_tokenizer(chat_template=chat_template)
    for sample in fictitious_authors(20):
        enc = encode_sample(tok, sample)
        prompt, _ = format_prompt(tok, sample.question)
        # the answer follows the prompt after one space (the byte tokenizer keeps it a token)
        sep = "" if prompt.endswith(("\n", " ")) else " "
        assert tok.decode(list(enc.input_ids)) == prompt + sep + sample.answer
        n_answer = sum(enc.answer_mask)
        assert list(enc.answer_mask) == [False] * (len(enc) - n_answer) + [True] * n_answer
        assert decode_where(tok, enc, enc.answer_mask) == sep + sample.answer
        assert decode_where(tok, enc, [not a for a in enc.answer_mask]) == prompt
        assert decode_where(tok, enc, enc.question_mask) == sample.question
        if chat_template:
            assert "<|assistant|>" in prompt and "<|user|>" in prompt
        else:
            assert prompt == f"Question: {sample.question}\nAnswer:"


def test_answer_mask_with_a_template_ending_in_a_newline():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    sample = fictitious_authors(1)[0]
    enc = encode_sample(tok, sample)
    assert decode_where(tok, enc, enc.answer_mask) == sample.answer  # no separator added


# Batches and answer targets -----------------------------------------------------------------
def test_collate_right_pads_and_targets_align():
    tok = tiny_tokenizer()
    encoded = encode_samples(tok, fictitious_authors(5))
    batch = collate(encoded, pad_token_id=0)
    lengths = [len(e) for e in encoded]
    assert batch.input_ids.shape == (5, max(lengths)) and batch.ids == [e.id for e in encoded]
    for i, e in enumerate(encoded):
        n = len(e)
        assert batch.input_ids[i, :n].tolist() == list(e.input_ids)
        assert (batch.input_ids[i, n:] == 0).all()
        assert batch.attention_mask[i].tolist() == [True] * n + [False] * (max(lengths) - n)
        assert batch.answer_mask[i, :n].tolist() == list(e.answer_mask)
        assert not batch.answer_mask[i, n:].any() and not batch.question_mask[i, n:].any()
    targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    # the logits at t predict token t + 1
    assert torch.equal(targets.positions[:, :-1], batch.answer_mask[:, 1:])
    assert not targets.positions[:, -1].any()
    assert targets.counts.tolist() == [sum(e.answer_mask) for e in encoded]
    expected = [i for e in encoded for i, m in zip(e.input_ids, e.answer_mask) if m]
    assert targets.tokens.tolist() == expected
    assert targets.sample.tolist() == [i for i, e in enumerate(encoded)
                                       for _ in range(sum(e.answer_mask))]


def test_batches_cover_every_sample_once_sorted_by_length():
    tok = tiny_tokenizer()
    encoded = encode_samples(tok, fictitious_authors(11))
    parts = batches(encoded, batch_size=4)
    assert [len(b) for b in parts] == [4, 4, 3]
    ids = [i for b in parts for i in b.ids]
    assert sorted(ids) == sorted(e.id for e in encoded)
    lengths = [int(b.attention_mask[j].sum()) for b in parts for j in range(len(b))]
    assert lengths == sorted(lengths)
    unsorted = batches(encoded, batch_size=4, sort_by_length=False)
    assert [i for b in unsorted for i in b.ids] == [e.id for e in encoded]
    with pytest.raises(ValueError):
        batches(encoded, batch_size=0)
    with pytest.raises(ValueError):
        collate([])


def test_tofu_ids_survive_a_question_asked_of_two_authors(tmp_path):
    """TOFU asks "What is the full name of the author?" of more than one author: a row is named
    by its question and answer, and every later row keeps its own author."""
    from cud.data.tofu import QUESTIONS_PER_AUTHOR as per, load_tofu
    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(3 * per)]
    for author in (0, 2):
        rows[author * per + 5] = {"question": "What is the full name of the author?",
                                  "answer": f"The author is number {author}."}
    lines = "\n".join(json.dumps(r) for r in rows)
    (tmp_path / "full.json").write_text(lines)
    (tmp_path / "forget01.json").write_text("\n".join(json.dumps(r) for r in rows[2 * per:]))
    (tmp_path / "retain99.json").write_text("\n".join(json.dumps(r) for r in rows[:2 * per]))
    forget, retain = load_tofu(f"tofu:{tmp_path}:forget01:retain99")
    assert [s.id for s in forget] == [f"tofu_a002.q{k:02d}" for k in range(per)]
    assert [s.id for s in retain] == [f"tofu_a{a:03d}.q{k:02d}" for a in (0, 1)
                                      for k in range(per)]
    _, first = load_tofu(f"tofu:{tmp_path}:forget01:retain99", retain_authors=1)
    assert len(first) == per and {s.extra["author"] for s in first} == {"a000"}
