"""Failures of the second round of hostile inputs (issue 25, items 6 to 14), one test or a few
per item; each test fails on the code the round looked at and passes once the failure is fixed
as its docstring says. Tiny models built in-process, the ``cud`` command line through typer's
``CliRunner`` (errors the commands catch) or the config reader directly (where the old code
would go on to run a whole pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cud.models import tiny_model
from conftest import invoke, one_line_error, save_model

QUICK = ["--steps", "2", "--n-edges", "10"]


# --- helpers -----------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def facts(n_authors: int = 2, per_author: int = 2) -> list[dict]:
    return [{"id": f"a{a}.f{j}", "question": f"What is fact {j} of author {a}?",
             "answer": f"It is {10 * a + j}."}
            for a in range(n_authors) for j in range(per_author)]


# --- 6. report drawings and CSVs: ids that differ only in odd characters -------------------------

#: ids the old drawing names mapped to one file (a/b, a_b, a b -> circuit_a_b.png), and one
#: with a comma (item 14)
ODD_IDS = ["a/b", "a_b", "a b", "c,d"]


@pytest.fixture(scope="module")
def odd_circuits(model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("odd")
    rows = [{"id": i, "question": f"What is {k}?", "answer": f"It is {k}."}
            for k, i in enumerate(ODD_IDS)]
    data = write_jsonl(folder / "odd.jsonl", rows)
    result = invoke("circuits", "--model", model_dir, "--data", data, "--out",
                    folder / "circuits", "--no-faithfulness", *QUICK)
    assert result.exit_code == 0, result.output
    return folder / "circuits"


def test_6_report_draws_each_id_into_its_own_file(odd_circuits, tmp_path):
    """Item 6: ``cud report --draw 'a/b,a_b,a b'`` drew three circuits into one PNG file
    (``circuit_a_b.png``) referenced three times. Expected: one file per id, the names the
    JSON export uses (percent-encoded), each referenced once by the page."""
    from cud.circuits.export import json_file_name
    result = invoke("report", "--circuits", odd_circuits, "--draw", "a/b,a_b,a b",
                    "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    drawn = sorted(p.name for p in (tmp_path / "r" / "figures").glob("circuit_*.png"))
    expected = sorted(f"circuit_{json_file_name(i).removesuffix('.json')}.png"
                      for i in ODD_IDS[:3])
    assert drawn == expected
    page = (tmp_path / "r" / "report.html").read_text()
    for name in expected:
        assert page.count(f"figures/{name}") == 1, name


@pytest.mark.parametrize("odd", ["carriage\rreturn", "NA", ""])
def test_6_tables_round_trip_ids_through_csv(odd, tmp_path):
    """Item 6: ids with newline, tab or quote did not survive the ``samples.csv`` round trip
    (a carriage return split the row when read back; ``NA`` and the empty id came back NaN).
    Expected: the CSV of every table reads back the same ids, in order, and the values."""
    from cud.tables import read_table, save_table
    ids = ["first", odd, "new\nline", "tab\there", 'quote"d', "crlf\r\nend", "007", "last"]
    values = [1.5, float("nan"), 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    table = pd.DataFrame({"value": values, "note": ["x", "y,z"] + ["w"] * 6},
                         index=pd.Index(ids, name="id"))
    _, csv = save_table(table, tmp_path / "samples")
    back = read_table(csv)
    assert list(back.index) == ids
    assert back["value"].iloc[0] == 1.5 and pd.isna(back["value"].iloc[1])
    assert list(back["note"]) == ["x", "y,z"] + ["w"] * 6


def test_6_circuits_samples_csv_round_trips_odd_ids(model_dir, tmp_path):
    """Item 6, through ``cud circuits``: its ``samples.csv`` reads back every id as written."""
    from cud.tables import read_table
    ids = ["line\nbreak", "car\rriage", 'quo"te', "tab\tbed"]
    rows = [{"id": i, "question": f"What is {k}?", "answer": f"It is {k}."}
            for k, i in enumerate(ids)]
    data = write_jsonl(tmp_path / "odd.jsonl", rows)
    result = invoke("circuits", "--model", model_dir, "--data", data, "--out", tmp_path / "c",
                    "--no-faithfulness", *QUICK)
    assert result.exit_code == 0, result.output
    assert list(read_table(tmp_path / "c" / "samples.csv").index) == ids


# --- 7. non-finite weights ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory) -> Path:
    lm = tiny_model("llama", seed=0)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    return save_model(lm, tmp_path_factory.mktemp("nan-model"))


@pytest.mark.parametrize("command", ["baselines", "unlearn"])
def test_7_model_with_a_nan_weight_is_refused(command, nan_model_dir, tmp_path):
    """Item 7: one NaN weight, and ``cud baselines`` / ``cud unlearn`` exit 0 with NaN in every
    value. Expected: refused when loaded, exit 2, one line naming the parameter."""
    extra = ["--method", "ga", "--max-steps", "1", "--no-utility"] if command == "unlearn" \
        else ["--metrics", "loss"]
    result = invoke(command, "--model", nan_model_dir, "--data", "builtin:16", *extra,
                    "--out", tmp_path / "out")
    one_line_error(result, str(nan_model_dir), "model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


# --- 8. forget and retain sets that overlap ----------------------------------------------------

def test_8_the_same_file_to_forget_and_retain_is_refused(model_dir, tmp_path):
    """Item 8: ``cud unlearn --forget F --data F`` ran. Expected: refused, exit 2, one line
    saying how many samples are shared and naming one."""
    data = write_jsonl(tmp_path / "f.jsonl", facts())
    result = invoke("unlearn", "--model", model_dir, "--forget", data, "--data", data,
                    "--method", "ga", "--max-steps", "1", "--no-utility", "--out", tmp_path / "u")
    one_line_error(result, "4 sample(s) by id", "'a0.f0'")


def test_8_the_same_text_under_other_ids_is_refused(model_dir, tmp_path):
    """Item 8: a retain set holding a forget sample's text under another id is overlap too."""
    forget = write_jsonl(tmp_path / "f.jsonl", facts())
    retain_rows = [dict(r, id="other." + r["id"]) for r in facts()[:1]] + \
        [{"id": "r.x", "question": "Who else?", "answer": "Someone."},
         {"id": "s.y", "question": "Who more?", "answer": "Nobody."}]
    retain = write_jsonl(tmp_path / "r.jsonl", retain_rows)
    result = invoke("unlearn", "--model", model_dir, "--forget", forget, "--data", retain,
                    "--method", "ga", "--max-steps", "1", "--no-utility", "--out", tmp_path / "u")
    one_line_error(result, "1 by text", "'a0.f0'", "'other.a0.f0'")


# --- 9. unknown or inapplicable settings -------------------------------------------------------

def test_9_unknown_method_parameter_is_refused(model_dir, tmp_path):
    """Item 9: ``cud unlearn --param nosuch=1`` ran with the parameter ignored. Expected:
    refused, exit 2, one line naming it."""
    result = invoke("unlearn", "--model", model_dir, "--data", "builtin:16", "--method", "ga",
                    "--max-steps", "1", "--no-utility", "--param", "nosuch=1",
                    "--out", tmp_path / "u")
    one_line_error(result, "'nosuch'")
    assert not (tmp_path / "u").exists()
    # a parameter one of the methods run has (NPO's beta, not GA's) stays accepted
    from cud.unlearning.folder import UnlearningSettings
    s = UnlearningSettings(methods=("ga", "npo"), params={"beta": 0.3})
    assert s.method_hyperparameters("npo")["beta"] == 0.3
    assert "beta" not in s.method_hyperparameters("ga")


@pytest.mark.parametrize("suffix,text,needles", [
    (".yaml", "model: x\ncircuits:\n  steps: 2\nunlearning:\n  max_steps: 3\ncircuits:\n"
              "  n_edges: 10\n", [":6", "'circuits'", "line 2"]),
    (".yaml", "circuits: {steps: 2, steps: 3}\n", [":1", "'steps'"]),
])
def test_9_config_with_a_section_or_key_twice_is_refused(suffix, text, needles, tmp_path):
    """Item 9: a YAML config with the same section twice silently dropped the first.
    Expected: refused, naming the file, the line and the key (TOML already refuses it, with its
    own message). Merge keys (``<<``) are no duplicates: an explicit key overrides the merged
    one."""
    from cud.config import load_config
    from cud.errors import ConfigError
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    for needle in needles:
        assert needle in message, (needle, message)
    path.write_text("circuits:\n  <<: {steps: 2, n_edges: 7}\n  n_edges: 9\n")
    cfg = load_config(path)
    assert (cfg.circuits.steps, cfg.circuits.n_edges) == (2, 9)


def test_9_split_on_a_jsonl_file_is_refused(model_dir, tmp_path):
    """Item 9: ``--split train`` on a ``.jsonl`` file was ignored. Expected: refused, exit 2,
    one line naming the file and the split."""
    data = write_jsonl(tmp_path / "d.jsonl", facts())
    result = invoke("circuits", "--model", model_dir, "--data", data, "--split", "train",
                    "--out", tmp_path / "c", *QUICK)
    one_line_error(result, "d.jsonl", "'train'")
    result = invoke("circuits", "--model", model_dir, "--data", "builtin:4", "--split", "train",
                    "--out", tmp_path / "c", *QUICK)
    one_line_error(result, "builtin", "'train'")


# --- 10. ranges of settings, and errors that blamed cud ----------------------------------------

def test_10_seed_out_of_range_in_a_toml_file_names_the_file_and_seed(tmp_path):
    """Item 10: ``seed = 99999999999999999999999999999`` in a TOML file ended in "unexpected
    ... this is a bug in cud". Expected: the config reader refuses it, naming file and seed."""
    from cud.config import load_config
    from cud.errors import ConfigError
    path = tmp_path / "run.toml"
    path.write_text("seed = 99999999999999999999999999999\n")
    with pytest.raises(ConfigError, match=r"run\.toml.*seed.*0 to 4294967295"):
        load_config(path)


def test_10_negative_seed_of_cud_run_is_refused_before_any_stage(tmp_path):
    """Item 10: ``cud run --seed -1`` failed only after circuits and unlearning had run.
    Expected: refused at once (exit 2, one line naming the seed), nothing written."""
    result = invoke("run", "--model", tmp_path / "no-model", "--seed", "-1", "--out",
                    tmp_path / "out")
    one_line_error(result, "seed", "-1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,args,needle", [
    ("unlearn", ["--lr", "nan"], "--lr"),
    ("unlearn", ["--lr", "inf"], "--lr"),
    ("unlearn", ["--threshold", "2"], "--threshold"),
    ("unlearn", ["--threshold", "0"], "--threshold"),
    ("unlearn", ["--seed", "-1"], "seed"),
    ("finetune", ["--lr", "nan"], "--lr"),
    ("circuits", ["--seed", str(2**32)], "--seed"),
    ("circuits", ["--batch-size", str(10**9)], "--batch-size"),
])
def test_10_out_of_range_options_are_refused_naming_the_option(command, args, needle,
                                                                model_dir, tmp_path):
    """Item 10: ``cud unlearn --lr nan``, ``cud finetune --lr nan`` ended in "unexpected ... a
    bug in cud"; ``--threshold 2`` (a probability) was accepted. Expected: refused before any
    work, exit 2, one line naming the option."""
    extra = {"unlearn": ["--method", "ga", "--max-steps", "1", "--no-utility"],
             "finetune": ["--cache-dir", tmp_path / "ft", "--epochs", "1"],
             "circuits": QUICK}[command]
    result = invoke(command, "--model", model_dir, "--data", "builtin:16", *extra, *args,
                    "--out", tmp_path / "out")
    one_line_error(result, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()


@pytest.fixture(scope="module")
def raising_template_dir(tmp_path_factory) -> Path:
    lm = tiny_model("llama", seed=0)
    lm.tokenizer.chat_template = "{{ raise_exception('this template refuses every turn') }}"
    return save_model(lm, tmp_path_factory.mktemp("raising-template"))


def test_10_chat_template_that_raises_names_the_tokenizer(raising_template_dir, tmp_path):
    """Item 10: a tokenizer whose chat template raises ended in "unexpected ... this is a bug
    in cud" (exit 1). Expected: exit 2, one line naming the model and the template's error."""
    result = invoke("circuits", "--model", raising_template_dir, "--data", "builtin:2",
                    "--out", tmp_path / "c", *QUICK)
    one_line_error(result, str(raising_template_dir), "chat template",
                   "this template refuses every turn")


# --- 11. steps past any real run -------------------------------------------------------------------

def test_11_huge_integration_steps_in_a_config_are_refused(tmp_path):
    """Item 11: ``[circuits] steps = 99999999999999999999`` ran until the machine killed it.
    Expected: the config reader refuses it, naming the file, the section and the maximum."""
    from cud.config import load_config
    from cud.errors import ConfigError
    path = tmp_path / "run.toml"
    path.write_text("[circuits]\nsteps = 99999999999999999999\n")
    with pytest.raises(ConfigError, match=r"run\.toml.*circuits.*steps.*from 1 to \d+"):
        load_config(path)


@pytest.mark.parametrize("section,key,value", [("unlearning", "max_steps", 10**12),
                                               ("finetune", "epochs", 1e9),
                                               ("unlearning", "batch_size", 10**9)])
def test_11_other_huge_steps_and_sizes_are_refused(section, key, value, tmp_path):
    from cud.config import load_config
    from cud.errors import ConfigError
    path = tmp_path / "run.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"run\.toml.*{key}"):
        load_config(path)


# --- 12. a YAML alias bomb, and echoed values ----------------------------------------------------

def test_12_yaml_alias_bomb_is_refused_with_a_short_line(tmp_path):
    """Item 12: a few hundred bytes of nested YAML aliases as ``model`` were refused with an
    error line of 80 MB. Expected: refused for the aliases' size, the line short."""
    from cud.config import load_config
    from cud.errors import ConfigError
    lines = ["model:", '  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcde", "bcdef"):
        lines.append(f"  - &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 500
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert len(message) < 300 and "alias" in message and str(path) in message, message[:500]


def test_12_a_long_value_is_echoed_as_a_short_prefix(tmp_path):
    """Item 12: an echoed value is cut to a short prefix, in the library's message and on the
    command line."""
    path = tmp_path / "run.yaml"
    path.write_text("model: [" + ", ".join(["x" * 100] * 500) + "]\n")
    result = invoke("run", "--config", path)
    line = one_line_error(result, "model", "...")
    assert len(line) < 300, line[:500]


# --- 13. plain-text prefix and cut ---------------------------------------------------------------

LONG_TEXT = " ".join(f"word{k}" for k in range(60))


def test_13_a_text_shorter_than_the_prefix_gets_half_its_tokens(tmp_path):
    """Item 13: a text shorter than the 32-token prefix was refused. Expected: its prefix is
    the first half of its tokens (at least one token each side)."""
    from cud.data import load_qa
    from cud.data.text import tokenize_text
    from cud.models.tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    data = write_jsonl(tmp_path / "t.jsonl", [{"id": "s", "text": "A short passage."}])
    sample, = load_qa(data)
    t = tokenize_text(tok, sample)
    n = sum(t.question_mask) + sum(t.answer_mask)
    assert n <= 32 and sum(t.question_mask) == round(n / 2) and sum(t.answer_mask) >= 1


def test_13_prefix_and_cut_are_command_line_options(model_dir, tmp_path):
    """Item 13: the prefix length and the cut were settable only in Python. Expected:
    ``--prefix-tokens`` and ``--max-tokens`` on the commands that read data."""
    data = write_jsonl(tmp_path / "t.jsonl", [{"id": "a.1", "text": LONG_TEXT},
                                              {"id": "b.1", "text": "Short one."}])
    result = invoke("baselines", "--model", model_dir, "--data", data, "--metrics", "loss",
                    "--prefix-tokens", "4", "--max-tokens", "20", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert f"1 text of {data} cut to 20 tokens" in result.output
    result = invoke("baselines", "--model", model_dir, "--data", data, "--metrics", "loss",
                    "--prefix-tokens", "30", "--max-tokens", "20", "--out", tmp_path / "b2")
    one_line_error(result, "--max-tokens", "prefix_tokens")


def test_13_prefix_and_cut_are_config_settings(tmp_path):
    """Item 13: ``[text] prefix_tokens`` / ``max_tokens`` in a run config."""
    from cud.config import load_config
    path = tmp_path / "run.toml"
    path.write_text("[text]\nprefix_tokens = 8\nmax_tokens = 64\n")
    cfg = load_config(path)
    assert (cfg.text.prefix_tokens, cfg.text.max_tokens) == (8, 64)


# --- 14. ids holding commas ----------------------------------------------------------------------

def test_14_report_draws_ids_from_a_file(odd_circuits, tmp_path):
    """Item 14: ``--draw`` took only a comma list, so an id with a comma could not be drawn.
    Expected: ``--draw @FILE`` reads one id a line."""
    from cud.circuits.export import json_file_name
    ids = tmp_path / "ids.txt"
    ids.write_text("c,d\na b\n")
    result = invoke("report", "--circuits", odd_circuits, "--draw", f"@{ids}",
                    "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    drawn = sorted(p.name for p in (tmp_path / "r" / "figures").glob("circuit_*.png"))
    assert drawn == sorted(f"circuit_{json_file_name(i).removesuffix('.json')}.png"
                           for i in ("c,d", "a b"))
    result = invoke("report", "--circuits", odd_circuits, "--draw", f"@{tmp_path / 'none'}",
                    "--out", tmp_path / "r2")
    one_line_error(result, "none")
