"""Plain-text forget sets (MUSE / WMDP style) beside QA pairs: reading them, the split into a
prefix and the continuation to be forgotten, the cut of long texts with its notice, QA encoding
unchanged, the outcomes that fit text, and text samples through every command on a tiny model
saved as a folder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import processors
from typer.testing import CliRunner

from cud.cli import app
from cud.data import QASample, TextSettings, encode_sample, is_text, load_qa, text_sample
from cud.data.encoding import PLAIN_TEMPLATE
from cud.data.prepare import add_perturbed_answers, load_run_data, with_perturbations
from cud.data.text import continuation_text, cut_notices, tokenize_text
from cud.errors import ConfigError, DataError
from cud.models import tiny_model, tiny_tokenizer

runner = CliRunner()

WORDS = ("river", "lantern", "copper", "meadow", "harbour", "violet", "granite", "orchard",
         "thunder", "saffron", "glacier", "cobalt", "willow", "ember", "quartz", "falcon", "amber")
#: 16 texts of 80 to 110 bytes (the tiny tokenizer: one token per byte), and one of 300 bytes
TEXTS = [f"Entry {i}: the {w} keeper counted {3 * i + 7} stones by the {WORDS[-1 - i]} gate, "
         f"then wrote the tally on a slate." for i, w in enumerate(WORDS[:16])]
LONG = "The long chronicle of the valley begins here. " * 7  # 322 bytes


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def expect_error(path: Path, line: int, field: str | None, needle: str, **kw) -> DataError:
    with pytest.raises(DataError) as err:
        load_qa(path, **kw)
    message = str(err.value)
    assert "\n" not in message and needle in message, message
    assert message.startswith(f"{path}:{line}"), message
    if field:
        assert f"field '{field}'" in message, message
    return err.value


def bos_tokenizer():
    """The tiny byte-level tokenizer with a BOS token added in front of every text."""
    tok = tiny_tokenizer(chat_template=False)
    bos = tok.convert_tokens_to_ids("<|bos|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    return tok


# --- reading ------------------------------------------------------------------------------------

def test_jsonl_and_csv_text_rows_are_text_samples(tmp_path):
    rows = [{"id": "a", "text": TEXTS[0]}, {"text": TEXTS[1], "source_url": "x"},
            {"id": 7, "text": TEXTS[2], "prefix": TEXTS[2][:20]}]
    for path in (write_jsonl(tmp_path / "t.jsonl", rows), write_csv(tmp_path / "t.csv", rows)):
        samples = load_qa(path)
        assert [s.id for s in samples] == ["a", "t-00001", "7"]
        assert all(is_text(s) for s in samples)
        assert [s.question + s.answer for s in samples] == TEXTS[:3]  # the text, verbatim
        assert samples[0].question == "" and samples[2].question == TEXTS[2][:20]
        assert samples[1].extra["source_url"] == "x"
        assert all(s.extra["text_settings"] == TextSettings() for s in samples)
        assert not any(k in s.extra for s in samples for k in ("text", "prefix"))
    assert [s.source for s in load_qa(tmp_path / "t.jsonl")] == \
        [f"{tmp_path / 't.jsonl'}:{i}" for i in (1, 2, 3)]
    assert [s.source.rsplit(":", 1)[1] for s in load_qa(tmp_path / "t.csv")] == ["2", "3", "4"]


def test_explicit_prefix_and_continuation(tmp_path):
    text = "Mr Musk's riches are up 8% from last year but down on his net worth in 2021."
    prefix, cont = "Mr Musk's riches are up 8% from last year but", "down on his net worth in 2021."
    for row in ({"prefix": prefix}, {"continuation": cont},
                {"prefix": prefix, "continuation": cont}):
        s, = load_qa(write_jsonl(tmp_path / "p.jsonl", [{"text": text, **row}]))
        assert (s.question, s.answer) == (prefix, " " + cont)


@pytest.mark.parametrize("rows, line, field, needle", [
    ([{"question": "Q?", "answer": "A."}, {"text": TEXTS[0]}], 2, "text",
     "a text in a file of QA pairs (line 1)"),
    ([{"text": TEXTS[0]}, {"text": TEXTS[1]}, {"question": "Q?", "answer": "A."}], 3,
     "question", "a QA pair in a file of texts (line 1)"),
    ([{"text": "   "}], 1, "text", "empty"),
    ([{"text": ""}], 1, "text", "empty"),
    ([{"text": 12}], 1, "text", "expected text"),
    ([{"id": "x"}], 1, "question", "missing"),
    ([{"text": TEXTS[0], "prefix": "Not the start"}], 1, "prefix", "does not begin"),
    ([{"text": TEXTS[0], "prefix": TEXTS[0]}], 1, "prefix", "nothing is left to forget"),
    ([{"text": TEXTS[0], "continuation": "no such end"}], 1, "continuation", "does not end"),
    ([{"text": TEXTS[0], "continuation": TEXTS[0]}], 1, "continuation", "no prefix"),
    ([{"text": "abc def ghi", "prefix": "abc", "continuation": "ghi"}], 1, "continuation",
     "not the prefix followed by the continuation"),
    ([{"text": TEXTS[0], "id": "d"}, {"text": TEXTS[1], "id": "d"}], 2, "id", "duplicate id"),
])
def test_bad_text_rows_name_file_line_and_field(rows, line, field, needle, tmp_path):
    expect_error(write_jsonl(tmp_path / "bad.jsonl", rows), line, field, needle)


def test_mixed_csv_and_qa_rows_with_a_text_column(tmp_path):
    mixed = write_csv(tmp_path / "mixed.csv", [{"question": "Q?", "answer": "A.", "text": ""},
                                               {"question": "", "answer": "", "text": TEXTS[0]}])
    expect_error(mixed, 3, "text", "a text in a file of QA pairs")
    # a QA row keeps a text field of its own as it always did (in extra): it is still QA
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A.", "text": "ctx"}])
    s, = load_qa(qa)
    assert not is_text(s) and s.extra == {"text": "ctx"}
    expect_error(write_jsonl(tmp_path / "k.jsonl", [{"question": "Q?", "answer": "A.",
                                                     "kind": "text"}]), 1, "kind", "marks a text")


def test_text_settings_are_checked_and_passed_through(tmp_path):
    for bad in ({"prefix_tokens": 0}, {"max_tokens": 8, "prefix_tokens": 8},
                {"prefix_tokens": 2.5}):
        with pytest.raises(ConfigError, match="text settings"):
            TextSettings(**bad)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS[:4]])
    settings = TextSettings(prefix_tokens=5, max_tokens=40)
    assert all(s.extra["text_settings"] == settings for s in load_qa(path, text=settings))
    data = load_run_data(str(path), text=settings)
    assert all(s.extra["text_settings"] == settings for s in data.taught)


# --- the split and the cut ----------------------------------------------------------------------

def test_default_split_is_the_first_32_tokens():
    tok = tiny_tokenizer()  # a chat template, which a text never uses
    s = text_sample("t", TEXTS[0])
    e = encode_sample(tok, s)
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]  # one token per byte
    assert e.input_ids == tuple(ids)  # no chat template, no added words
    assert e.question_mask == (True,) * 32 + (False,) * (len(ids) - 32)
    assert e.answer_mask == (False,) * 32 + (True,) * (len(ids) - 32)
    assert tok.decode(list(e.input_ids[:32])) == TEXTS[0][:32]
    assert continuation_text(tok, s) == TEXTS[0][32:].strip()


def test_split_keeps_the_tokenizers_special_tokens_outside_both_parts():
    tok = bos_tokenizer()
    bos = tok.convert_tokens_to_ids("<|bos|>")
    e = encode_sample(tok, text_sample("t", TEXTS[1], settings=TextSettings(prefix_tokens=10)))
    n = len(TEXTS[1].encode())
    assert e.input_ids[0] == bos and len(e) == n + 1
    assert e.question_mask == (False,) + (True,) * 10 + (False,) * (n - 10)
    assert e.answer_mask == (False,) * 11 + (True,) * (n - 10)


def test_explicit_prefix_splits_where_it_ends(tmp_path):
    tok = tiny_tokenizer()
    text = TEXTS[3]
    s, = load_qa(write_jsonl(tmp_path / "p.jsonl", [{"text": text, "prefix": text[:9]}]))
    e = encode_sample(tok, s)
    assert e.input_ids == tuple(tok(text, add_special_tokens=False)["input_ids"])
    assert sum(e.question_mask) == 9 and e.question_mask[:9] == (True,) * 9
    assert e.answer_mask == (False,) * 9 + (True,) * (len(text) - 9)


def test_long_texts_are_cut_with_a_notice(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "forget.jsonl", [{"text": TEXTS[0]}, {"text": LONG},
                                                   {"text": LONG + LONG}])
    samples = load_qa(path)
    assert cut_notices(samples, tok) == [  # without a model: the default window of 512
        f"1 text of {path} cut to 512 tokens (the longest had {2 * len(LONG)})"]
    notices = cut_notices(samples, tok, max_length=256)
    assert notices == [f"2 texts of {path} cut to 256 tokens, the model's maximum "
                       f"(the longest had {2 * len(LONG)})"]
    e = encode_sample(tok, samples[1], max_length=256)
    assert len(e) == 256 and sum(e.answer_mask) == 256 - 32
    assert e.input_ids == tuple(tok(LONG, add_special_tokens=False)["input_ids"][:256])
    small = load_qa(path, text=TextSettings(prefix_tokens=4, max_tokens=50))
    assert cut_notices(small, tok, max_length=256) == \
        [f"3 texts of {path} cut to 50 tokens (the longest had {2 * len(LONG)})"]
    assert len(encode_sample(tok, small[0], max_length=256)) == 50
    # QA samples are never cut: too long is an error, as before
    with pytest.raises(DataError, match="longer than the model's"):
        encode_sample(tok, QASample("q", "Q?", LONG), max_length=64)


def test_a_text_too_short_for_a_continuation_names_file_line_and_field(tmp_path):
    """A one-token text cannot be split (a text shorter than the prefix gets half its tokens as
    the prefix: tests/test_failures_found_3.py)."""
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": TEXTS[0]}, {"text": "T"}])
    samples = load_qa(path)  # the split is in the model's tokens: found when encoding
    with pytest.raises(DataError) as err:
        encode_sample(tok, samples[1])
    message = str(err.value)
    assert message.startswith(f"{path}:2, field 'text'") and "none left for the continuation" \
        in message and "\n" not in message
    with pytest.raises(DataError, match="no room for a continuation"):
        tokenize_text(tok, text_sample("w", TEXTS[0]), max_length=32)
    with pytest.raises(DataError, match="field 'text'"):
        cut_notices(samples, tok)


# --- QA encoding unchanged ----------------------------------------------------------------------

QA = [QASample("q1", "Who wrote the letter?", "Maren Holt wrote it in 1931."),
      QASample("q2", "What is the capital of Elbonia?", "Mudville"),
      QASample("q3", "Where?\nThere.", "  Here, with spaces  ")]


@pytest.mark.parametrize("chat", [True, False])
def test_qa_encoding_is_unchanged(chat, tmp_path):
    """Prompt and answer tokenised by hand (byte-level: tokenising the parts alone gives the
    same tokens as tokenising them together) against encode_sample, field by field."""
    tok = tiny_tokenizer(chat_template=chat)
    loaded = load_qa(write_jsonl(tmp_path / "qa.jsonl", [
        {"id": s.id, "question": s.question, "answer": s.answer, "text": "context"} for s in QA]))
    for s in QA + loaded:
        if chat:
            prompt = f"<|user|>{s.question}\n<|assistant|>"
            start = len(tok("<|user|>", add_special_tokens=False)["input_ids"])
        else:
            prompt = PLAIN_TEMPLATE.format(question=s.question)
            start = len("Question: ")
        p = tok(prompt, add_special_tokens=not chat)["input_ids"]
        a = tok(" " + s.answer, add_special_tokens=False)["input_ids"]
        q = len(s.question.encode())
        e = encode_sample(tok, s)
        assert e.id == s.id and e.input_ids == tuple(p + a)
        assert e.answer_mask == (False,) * len(p) + (True,) * len(a)
        assert e.question_mask == (False,) * start + (True,) * q + \
            (False,) * (len(p) + len(a) - start - q)


# --- outcomes that fit text ---------------------------------------------------------------------

def test_perturbed_answers_are_not_invented_for_texts():
    qa = [QASample(f"a{i}.year", f"Year of {i}?", str(1900 + i)) for i in range(5)]
    texts = [text_sample(f"t{i}", t) for i, t in enumerate(TEXTS[:3])]
    assert with_perturbations(texts) == texts
    assert all("perturbed_answer" not in s.extra for s in with_perturbations(texts))
    mixed = add_perturbed_answers(texts + qa)
    assert all("perturbed_answer" not in s.extra for s in mixed[:3])
    for s in mixed[3:]:  # wrong answers come from QA answers only
        assert set(s.extra["perturbed_answer"]) <= {q.answer for q in qa} - {s.answer}


def test_outcomes_of_text_samples(make_lm, single_thread):
    from cud.unlearning.outcomes import evaluate_outcomes, greedy_answers, rouge_l_recall

    lm = make_lm("llama")
    samples = [text_sample(f"t{i}", t) for i, t in enumerate(TEXTS[:3])] + \
        [text_sample("long", LONG + LONG)]  # 644 tokens: cut to the model's 256
    df = evaluate_outcomes(lm, samples, max_new_tokens=12)
    assert df.index.tolist() == [s.id for s in samples]
    assert df["n_answer_tokens"].tolist() == [len(t) - 32 for t in TEXTS[:3]] + [256 - 32]
    assert (df["nll"] > 0).all() and df["nll"].map(math.isfinite).all()
    assert ((df["prob"] > 0) & (df["prob"] < 1)).all()
    assert df["exact_mem"].between(0, 1).all() and df["extraction_strength"].between(0, 1).all()
    assert df["truth_ratio"].isna().all()  # no wrong answers for a text: NaN, not an error
    tok = lm.tokenizer
    for s in samples[:2]:  # greedy decoding continues the prefix itself
        prefix = torch.tensor([tok(TEXTS[int(s.id[1])][:32], add_special_tokens=False)
                               ["input_ids"]])
        out = lm.model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                                max_new_tokens=12, do_sample=False, pad_token_id=lm.pad_token_id,
                                eos_token_id=tok.eos_token_id)
        assert df.loc[s.id, "greedy_answer"] == \
            tok.decode(out[0, 32:], skip_special_tokens=True).strip()
        assert df.loc[s.id, "rougeL_recall"] == pytest.approx(rouge_l_recall(
            df.loc[s.id, "greedy_answer"], TEXTS[int(s.id[1])][32:].strip()))
    assert set(greedy_answers(lm, samples, max_new_tokens=2)) == {s.id for s in samples}


# --- every command on a tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-text")
    lm = tiny_model("llama", seed=0)  # 256 positions
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """16 texts, the last one (t15) cut to the tiny model's 256 positions."""
    folder = tmp_path_factory.mktemp("texts")
    rows = [{"id": f"t{i:02d}", "text": t} for i, t in enumerate(TEXTS[:15])]
    rows.append({"id": "t15", "text": LONG})
    return write_jsonl(folder / "forget.jsonl", rows)


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output


def cut_line(texts: Path) -> str:
    return f"1 text of {texts} cut to 256 tokens, the model's maximum (the longest had {len(LONG)})"


@pytest.fixture(scope="module")
def stages(tiny_folder, texts, tmp_path_factory, single_thread):
    """circuits, unlearn and baselines of the texts, run once: folder per stage, and outputs."""
    root = tmp_path_factory.mktemp("stages")
    outputs = {}
    outputs["circuits"] = invoke("circuits", "--model", tiny_folder, "--data", texts,
                                 "--steps", 2, "--n-edges", 10, "--out", root / "circuits")
    outputs["unlearn"] = invoke("unlearn", "--model", tiny_folder, "--data", texts,
                                "--method", "ga", "--max-steps", 2, "--batch-size", 4,
                                "--no-utility", "--out", root / "unlearning")
    outputs["baselines"] = invoke("baselines", "--model", tiny_folder, "--data", texts,
                                  "--metrics", "loss,min_k_prob,random",
                                  "--out", root / "baselines")
    return root, outputs


def test_finetune_command_on_texts(tiny_folder, texts, tmp_path, single_thread):
    out = invoke("finetune", "--model", tiny_folder, "--data", texts, "--epochs", 1,
                 "--batch-size", 8, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "ft")
    assert cut_line(texts) in out.splitlines()  # one line, said once per file
    assert out.count("cut to") == 1
    table = pd.read_parquet(tmp_path / "ft" / "memorisation.parquet")
    assert len(table) == 16 and table["nll"].notna().all()


def test_circuits_command_on_texts(stages, texts):
    from cud.circuits.store import load_circuits

    root, outputs = stages
    assert cut_line(texts) in outputs["circuits"].splitlines()
    cs = load_circuits(root / "circuits")
    assert len(cs) == 16 and cs.edge_scores.abs().sum(1).gt(0).all()  # no circuit is all zero
    n = dict(zip(cs.table["id"], cs.table["n_answer_tokens"]))
    assert n["t00"] == len(TEXTS[0]) - 32 and n["t15"] == 256 - 32  # continuation, after the cut


def test_unlearn_command_on_texts(stages, texts):
    root, outputs = stages
    assert cut_line(texts) in outputs["unlearn"].splitlines()
    before = pd.read_parquet(root / "unlearning" / "before.parquet")
    assert {"nll", "prob", "exact_mem", "rougeL_recall"} <= set(before.columns)
    assert len(before) == 8 and before["nll"].gt(0).all()  # half the 16 texts are forgotten
    assert before["truth_ratio"].isna().all()
    ga = pd.read_parquet(root / "unlearning" / "ga" / "outcomes.parquet")
    assert ga["nll_delta"].notna().all() and (ga["nll_delta"] > 0).any()


def test_baselines_command_on_texts(stages, texts):
    root, outputs = stages
    assert cut_line(texts) in outputs["baselines"].splitlines()
    table = pd.read_parquet(root / "baselines" / "baselines.parquet")
    assert len(table) == 16 and {"loss", "min_k_prob", "random"} <= set(table.columns)
    assert table["loss"].gt(0).all()


def test_anchors_score_validate_and_report_on_texts(stages, texts, tmp_path):
    root, _ = stages
    invoke("anchors", "--circuits", root / "circuits", "--outcomes", root / "unlearning",
           "--k", 1, "--pool", 1, "--out", tmp_path / "anchors")
    chosen = json.loads((tmp_path / "anchors" / "anchors.json").read_text())["anchors"]
    assert len(chosen["easy"]) == len(chosen["hard"]) == 1  # forgotten texts: t-ids
    assert {*chosen["easy"], *chosen["hard"]} <= {f"t{i:02d}" for i in range(16)}
    invoke("score", "--circuits", root / "circuits", "--anchors", tmp_path / "anchors",
           "--out", tmp_path / "scores")
    scores = pd.read_parquet(tmp_path / "scores" / "scores.parquet")
    assert len(scores) == 16 and scores["cud"].dropna().between(0, 1).all()
    invoke("validate", "--circuits", root / "circuits", "--outcomes", root / "unlearning",
           "--baselines", root / "baselines", "--k", 1, "--pools", 1, "--n-boot", 50,
           "--no-predictor", "--no-variants", "--out", tmp_path / "validation")
    heldout = pd.read_parquet(tmp_path / "validation" / "heldout.parquet")
    assert {"cud", "loss"} <= set(heldout["metric"])
    out = invoke("report", "--circuits", root / "circuits", "--scores", tmp_path / "scores",
                 "--outcomes", root / "unlearning", "--baselines", root / "baselines",
                 "--data", texts, "--out", tmp_path / "report")
    html = Path(out.strip().splitlines()[-1])
    assert html.is_file() and html.stat().st_size > 10_000


def test_a_short_text_is_refused_in_one_line_before_any_work(tiny_folder, tmp_path):
    """A one-token text: too short to split at all."""
    data = write_jsonl(tmp_path / "short.jsonl", [{"text": TEXTS[0]}, {"text": "T"}])
    result = runner.invoke(app, ["baselines", "--model", tiny_folder, "--data", str(data),
                                 "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    line, = result.output.strip().splitlines()
    assert line.startswith(f"error: {data}:2, field 'text'") and "Traceback" not in line
    assert not (tmp_path / "b" / "baselines.parquet").exists()


def test_run_command_on_texts(tiny_folder, tmp_path, single_thread):
    rows = [{"id": f"t{i:02d}", "text": t} for i, t in enumerate(TEXTS)]
    rows[3]["text"] = LONG
    data = write_jsonl(tmp_path / "texts.jsonl", rows)
    config = tmp_path / "run.toml"
    config.write_text(
        f'preset = "quick"\nmodel = "{tiny_folder}"\ndata = "{data}"\nout = "{tmp_path / "out"}"\n'
        f'[finetune]\ncache_dir = "{tmp_path / "ft"}"\nepochs = 1\n'
        f'[circuits]\nn_edges = 20\nbatch_size = 8\n'
        f'[unlearning]\nmax_steps = 2\nmethods = ["ga", "npo"]\n'
        f'[baselines]\nmrd_k = 2\n'
        f'[study]\nk = 1\npools = 1\nn_boot = 50\nn_perm = 50\nsizes = [10, 20]\n'
        f'variant_sizes = [10, 20]\n')
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"1 text of {data} cut to 256 tokens" in result.output
    out = tmp_path / "out"
    assert (out / "report" / "report.html").is_file()
    run = json.loads((out / "run.json").read_text())
    assert {"circuits", "unlearning", "validation", "report"} <= set(run["seconds"])
    forget = pd.read_csv(out / "forget.csv", keep_default_na=False)
    assert len(forget) == 8 and (forget["question"] == "").all()  # split when encoded
    before = pd.read_parquet(out / "unlearning" / "before.parquet")
    assert before["nll"].gt(0).all() and before["truth_ratio"].isna().all()
    assert set(pd.read_parquet(out / "scores" / "scores.parquet")["id"]) == set(forget["id"])


def test_text_settings_are_part_of_every_cache_key():
    """Another split of the same text is another sample: no cache or folder reuses it."""
    from cud.circuits.store import text_hash
    from cud.unlearning.finetune import FinetuneSettings, cache_key
    from cud.unlearning.folder import samples_hash
    a = text_sample("t1", "One long text about nothing in particular.")
    b = text_sample("t1", "One long text about nothing in particular.",
                    settings=TextSettings(prefix_tokens=8))
    assert a.identity() != b.identity() and text_hash(a) != text_hash(b)
    assert samples_hash([a]) != samples_hash([b])
    assert cache_key("m", [a], FinetuneSettings()) != cache_key("m", [b], FinetuneSettings())
    qa = QASample("q1", "Who?", "Me.")
    assert qa.identity() == json.dumps(["q1", "Who?", "Me."])  # QA keys as before
