"""Bad input (data files, model paths, output folders, numbers, options, config files), through
the CLI: every kind is answered by one line ``error: ...`` naming the place
(file and line or field, model, folder, option or value) and exit status 2; never a traceback;
and results computed before the error are still there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cud.cli import app
from cud.models import tiny_model
from cud.circuits.store import load_circuits
from conftest import one_line_error

QUICK = ["--steps", "2", "--n-edges", "10"]


def circuits(model: Path | str, data: str | Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["circuits", "--model", str(model), "--data", str(data),
                                    "--out", str(out), *QUICK, *extra])


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def row(i: int, **fields) -> str:
    return json.dumps({"id": f"q{i}", "question": f"What is item {i}?",
                       "answer": f"It is {i}.", **fields})


# --- data files --------------------------------------------------------------------------------

def _malformed_json_line(d):
    return write(d / "a.jsonl", row(0) + '\n{"question": "x?", "answer": \n'), ["a.jsonl:2",
                                                                                 "malformed JSON"]


def _missing_field(d):
    return write(d / "a.jsonl", row(0) + '\n{"question": "x?"}\n'), ["a.jsonl:2",
                                                                     "field 'answer'", "missing"]


def _empty_field(d):
    return write(d / "a.jsonl", '{"question": "  ", "answer": "y"}\n'), ["a.jsonl:1",
                                                                         "field 'question'",
                                                                         "empty"]


def _wrong_type_field(d):
    return write(d / "a.jsonl", '{"question": "x?", "answer": 5}\n'), ["a.jsonl:1",
                                                                       "field 'answer'",
                                                                       "expected text"]


def _non_utf8_bytes(d):
    latin1 = '{"question": "Where is the caf\xe9?", "answer": "Here."}'.encode("latin-1")
    return write(d / "a.jsonl", row(0).encode() + b"\n" + latin1), ["a.jsonl:2",
                                                                    "not valid UTF-8"]


def _duplicate_ids(d):
    return write(d / "a.jsonl", row(0) + "\n" + row(0) + "\n"), ["a.jsonl:2", "field 'id'",
                                                                 "duplicate id 'q0'"]


def _sample_too_long(d):
    return write(d / "a.jsonl", row(0) + "\n" + row(1, question="why " * 100) + "\n"), \
        ["a.jsonl:2", "field 'question'", "longer than the model's 256"]


def _csv_extra_cells(d):
    return write(d / "a.csv", "question,answer\nx?,y\nx?,y,z\n"), ["a.csv:3", "more cells"]


def _csv_cell_over_size_limit(d):
    return write(d / "a.csv", "question,answer\nx?,y\n\"" + "w" * 200_000 + "\",y\n"), \
        ["a.csv", "malformed CSV", "field larger than field limit"]


def _json_nested_too_deeply(d):
    return write(d / "a.json", "[" * 100_000), ["a.json", "nested too deeply"]


def _data_file_missing(d):
    return d / "nope.jsonl", ["nope.jsonl", "no such file"]


def _unknown_data_format(d):
    return write(d / "a.txt", "question? answer"), ["a.txt", "unknown data format"]


def _folder_not_a_dataset(d):
    (d / "ds").mkdir()
    return d / "ds", ["ds", "not a dataset saved with save_to_disk"]


DATA = [_malformed_json_line, _missing_field, _empty_field, _wrong_type_field, _non_utf8_bytes,
        _duplicate_ids, _sample_too_long, _csv_extra_cells, _csv_cell_over_size_limit,
        _json_nested_too_deeply, _data_file_missing, _unknown_data_format, _folder_not_a_dataset]


@pytest.mark.parametrize("case", DATA, ids=lambda f: f.__name__.strip("_"))
def test_bad_data_file(case, model_dir, tmp_path):
    data, needles = case(tmp_path)
    one_line_error(circuits(model_dir, data, tmp_path / "out"), *needles)


# --- model paths -------------------------------------------------------------------------------

def _copy(model_dir: Path, d: Path, *skip: str) -> Path:
    target = d / "model"
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns(*skip))
    return target


def _gguf_that_is_not_one(model_dir, d):
    return write(d / "m.gguf", b"PK\x03\x04 a zip file"), ["m.gguf", "not a GGUF file"]


def _truncated_gguf(model_dir, d):
    return write(d / "m.gguf", b"GGUF\x03\x00\x00\x00cut"), ["m.gguf", "not a readable GGUF"]


def _unknown_architecture(model_dir, d):
    m = _copy(model_dir, d)
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "model_type": "bert_x"}))
    return m, ["model", "unsupported architecture 'bert_x'"]


def _config_not_json(model_dir, d):
    m = _copy(model_dir, d)
    (m / "config.json").write_text("{not json")
    return m, ["config.json", "not a valid JSON config"]


def _no_weights(model_dir, d):
    return _copy(model_dir, d, "*.safetensors"), ["model", "no weights"]


def _truncated_weights(model_dir, d):
    m = _copy(model_dir, d)
    blob = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    return m, ["model", "cannot load the weights", "truncated or damaged"]


def _no_tokenizer(model_dir, d):
    return _copy(model_dir, d, "tokenizer*", "chat_template*"), ["model", "no tokenizer"]


def _model_path_missing(model_dir, d):
    return d / "nomodel", ["nomodel", "no such model folder"]


MODELS = [_gguf_that_is_not_one, _truncated_gguf, _unknown_architecture, _config_not_json,
          _no_weights, _truncated_weights, _no_tokenizer, _model_path_missing]


@pytest.mark.parametrize("case", MODELS, ids=lambda f: f.__name__.strip("_"))
def test_bad_model(case, model_dir, tmp_path):
    model, needles = case(model_dir, tmp_path)
    one_line_error(circuits(model, "builtin:2", tmp_path / "out"), *needles)


# --- output folders ----------------------------------------------------------------------------

def test_output_folder_that_is_a_file(model_dir, tmp_path):
    write(tmp_path / "out", "x")
    one_line_error(circuits(model_dir, "builtin:2", tmp_path / "out"), "out",
                   "not a folder")


def test_output_folder_of_an_incompatible_version(model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    write(tmp_path / "out" / "manifest.json", json.dumps({"kind": "cud-circuits",
                                                          "format_version": 999}))
    one_line_error(circuits(model_dir, "builtin:2", tmp_path / "out"), "out",
                   "incompatible", "format 999")


def test_output_folder_of_other_settings_keeps_its_results(model_dir, tmp_path):
    assert circuits(model_dir, "builtin:2", tmp_path / "out").exit_code == 0
    before = load_circuits(tmp_path / "out")
    line = one_line_error(circuits(model_dir, "builtin:2", tmp_path / "out", "--steps", "3"),
                          "out", "other settings", "steps")
    assert "use another --out" in line
    after = load_circuits(tmp_path / "out")
    assert after.ids == before.ids and torch.equal(after.edge_scores, before.edge_scores)


def test_damaged_shard_is_named(model_dir, tmp_path):
    assert circuits(model_dir, "builtin:2", tmp_path / "out").exit_code == 0
    rows = next((tmp_path / "out" / "shards").glob("rows-*.parquet"))
    rows.write_bytes(b"not parquet")
    one_line_error(circuits(model_dir, "builtin:3", tmp_path / "out"), rows.name,
                   "unreadable shard")


def test_bad_data_on_resume_loses_nothing(model_dir, tmp_path):
    good = write(tmp_path / "a.jsonl", "\n".join(row(i) for i in range(3)) + "\n")
    assert circuits(model_dir, good, tmp_path / "out").exit_code == 0
    before = load_circuits(tmp_path / "out")
    bad = write(tmp_path / "b.jsonl", good.read_text() + row(3, question="why " * 100) + "\n")
    one_line_error(circuits(model_dir, bad, tmp_path / "out"), "b.jsonl:4", "longer than")
    after = load_circuits(tmp_path / "out")
    assert after.ids == before.ids and torch.equal(after.edge_scores, before.edge_scores)
    assert (tmp_path / "out" / "samples.parquet").exists()


# --- numbers -----------------------------------------------------------------------------------

def test_nan_scores_from_overflow_stop_and_keep_earlier_batches(tmp_path):
    """An embedding row of 1e5 overflows float16 (max 65504): the samples holding that token
    get non-finite scores; the batches before them are committed and stay."""
    lm = tiny_model("llama", seed=0)
    hot = lm.tokenizer.convert_tokens_to_ids("~")
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[hot] = 1e5
    lm.model.save_pretrained(tmp_path / "hot")
    lm.tokenizer.save_pretrained(tmp_path / "hot")
    rows = [row(i) for i in range(3)] + [json.dumps({"id": "tilde", "question": "Where is ~ ?",
                                                     "answer": "It is at ~ , far away."})]
    data = write(tmp_path / "a.jsonl", "\n".join(rows) + "\n")
    result = circuits(tmp_path / "hot", data, tmp_path / "out", "--dtype", "float16",
                      "--batch-size", "1")
    one_line_error(result, "sample(s) tilde", "non-finite edge scores", "--dtype float32")
    kept = load_circuits(tmp_path / "out")
    assert sorted(kept.ids) == ["q0", "q1", "q2"]
    assert torch.isfinite(kept.edge_scores).all()


# --- command-line options ----------------------------------------------------------------------

OPTIONS = {
    "batch_size_zero": (["--batch-size", "0"], ["--batch-size", "0"]),
    "workers_zero": (["--workers", "0"], ["--workers", "0"]),
    "negative_limit": (["--limit", "-1"], ["--limit", "-1"]),
    "unknown_device": (["--device", "tpu9"], ["device 'tpu9'"]),
    "cuda_without_gpu": (["--device", "cuda"], ["'cuda'", "CUDA is not available"]),
    "unknown_dtype": (["--dtype", "int3"], ["dtype 'int3'"]),
    "unknown_method": (["--method", "nope"], ["method 'nope'"]),
    "unknown_metric": (["--metric", "nope"], ["metric 'nope'"]),
    "threshold_without_value": (["--selection", "threshold"], ["--threshold"]),
    "mean_ablation_without_reference": (["--ablation", "mean"], ["--reference"]),
    "bad_builtin_spec": (["--data", "builtin:x"], ["builtin:x"]),
    "unreachable_ray_address": (["--ray-address", "127.0.0.1:1"],
                                ["--ray-address 127.0.0.1:1", "no Ray cluster reachable"]),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_bad_option(name, model_dir, tmp_path):
    if name == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra, needles = OPTIONS[name]
    data = [] if "--data" in extra else ["--data", "builtin:2"]
    result = CliRunner().invoke(app, ["circuits", "--model", str(model_dir), *data,
                                      "--out", str(tmp_path / "out"), *QUICK, *extra])
    one_line_error(result, *needles)


@pytest.mark.parametrize("extra,needles", [
    (["--metrics", "nope"], ["baseline metric(s) nope"]),
    (["--metrics", "mrd", "--mrd-k", "0"], ["K >= 1", "got 0"]),
    (["--workers", "0"], ["--workers", "0"]),
])
def test_bad_baselines_option(extra, needles, model_dir, tmp_path):
    result = CliRunner().invoke(app, ["baselines", "--model", str(model_dir), "--data",
                                      "builtin:2", "--out", str(tmp_path / "b"), *extra])
    one_line_error(result, *needles)


# --- config files (`cud run --config`) ---------------------------------------------------------

CONFIGS = {
    "missing_file": (None, ["nope.toml", "no such config file"]),
    "invalid_toml": ('model = "x"\n[circuits]\nn_edges = \n', ["c.toml", "invalid TOML",
                                                                "line 3"]),
    "unknown_key": ("[circuits]\nn_edgez = 5\n", ["c.toml", "unknown key 'circuits.n_edgez'"]),
    "wrong_type": ('[circuits]\nn_edges = "many"\n', ["c.toml", "circuits.n_edges",
                                                      "expected an integer"]),
    "invalid_yaml": ("circuits:\n  n_edges: [1\n", ["c.yaml", "invalid YAML"]),
    "non_utf8": (b'model = "caf\xe9"\n', ["c.toml", "not UTF-8"]),
    "unknown_format": ("model: x\n", ["c.ini", "unknown config format"]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_bad_config_file(name, tmp_path):
    text, needles = CONFIGS[name]
    suffix = {"invalid_yaml": ".yaml", "unknown_format": ".ini"}.get(name, ".toml")
    path = tmp_path / ("nope.toml" if text is None else f"c{suffix}")
    if text is not None:
        write(path, text)
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--out",
                                      str(tmp_path / "out")])
    one_line_error(result, *needles)
    assert not (tmp_path / "out").exists()  # refused before any work
