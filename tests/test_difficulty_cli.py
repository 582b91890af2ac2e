"""`cud anchors`, `cud score` and `cud validate` on the outputs of `cud circuits`, `cud unlearn`
and `cud baselines` for a tiny model saved as a folder."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from cud.cli import app
from cud.models.tiny import tiny_model

runner = CliRunner()
DATA = "builtin:40"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("difficulty-cli")
    lm = tiny_model("llama", seed=0)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    model = root / "model"
    steps = [
        ("circuits", "--model", model, "--data", DATA, "--steps", 2, "--n-edges", 12,
         "--no-faithfulness", "--out", root / "circuits"),
        ("unlearn", "--model", model, "--data", DATA, "--method", "ga,npo", "--max-steps", 2,
         "--batch-size", 4, "--out", root / "unlearn"),
        ("baselines", "--model", model, "--data", DATA, "--mrd-k", 2, "--metrics",
         "loss,prob,mrd,random", "--out", root / "baselines"),
    ]
    for args in steps:
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return root


def test_anchors_then_score(pipeline, tmp_path):
    result = invoke("anchors", "--circuits", pipeline / "circuits", "--outcomes",
                    pipeline / "unlearn", "--k", 2, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "a" / "anchors.json").read_text())
    assert meta["anchors"]["source"] == "outcomes" and len(meta["anchors"]["easy"]) >= 1
    result = invoke("score", "--circuits", pipeline / "circuits", "--anchors", tmp_path / "a",
                    "--distance", "all", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(tmp_path / "s" / "scores.parquet")
    assert set(scores["distance"]) == {"cosine", "jaccard", "hamming"}
    assert scores["cud"].between(0, 1).all() and len(scores) == 3 * 40
    easy = scores[(scores["anchor_role"] == "easy") & (scores["distance"] == "cosine")]
    assert len(easy) == len(meta["anchors"]["easy"])


def test_user_anchor_ids(pipeline, tmp_path):
    ids = pd.read_parquet(pipeline / "circuits" / "samples.parquet")["id"].tolist()
    (tmp_path / "easy.txt").write_text("\n".join(ids[:2]) + "\n")
    result = invoke("anchors", "--circuits", pipeline / "circuits", "--easy-ids",
                    tmp_path / "easy.txt", "--hard-ids", ",".join(ids[2:4]), "--n-edges", 8,
                    "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "a" / "anchors.json").read_text())
    assert meta["anchors"]["easy"] == ids[:2] and meta["selection"]["n_edges"] == 8


def test_validate_with_split_protocol(pipeline, tmp_path):
    out = tmp_path / "v"
    result = invoke("validate", "--circuits", pipeline / "circuits", "--outcomes",
                    pipeline / "unlearn", "--baselines", pipeline / "baselines", "--k", 2,
                    "--sizes", "8,12", "--n-boot", 50, "--split-method", "ga", "--model",
                    pipeline / "model", "--data", DATA, "--out", out)
    assert result.exit_code == 0, result.output
    assert "held-out" in result.output and "cross-method" in result.output
    held = pd.read_parquet(out / "heldout.parquet")
    assert {"cud", "predictor", "loss", "prob", "mrd", "random"} <= set(held["metric"])
    assert set(held["method"]) == {"ga", "npo"}
    study = json.loads((out / "study.json").read_text())
    assert not set(study["held_out"]) & set(study["excluded"])
    assert (held["n"] <= len(study["held_out"])).all()
    split = pd.read_parquet(out / "split_forget.parquet")
    assert set(split.index) <= set(study["held_out"]) and len(split) >= 2
    assert (out / "robustness.csv").is_file() and (out / "agreement_nll_after.csv").is_file()


def test_errors_are_one_line(pipeline, tmp_path):
    result = invoke("anchors", "--circuits", pipeline / "circuits", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "exactly one of" in result.output
    result = invoke("score", "--circuits", pipeline / "circuits", "--anchors", tmp_path,
                    "--out", tmp_path / "s")
    assert result.exit_code == 2 and "not an anchors folder" in result.output
    result = invoke("validate", "--circuits", pipeline / "circuits", "--outcomes",
                    pipeline / "unlearn", "--method", "rmu", "--out", tmp_path / "v")
    assert result.exit_code == 2 and "rmu" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_validate_with_pilots_writes_the_ladder(pipeline, tmp_path):
    result = invoke("pilot", "--model", pipeline / "model", "--data", DATA, "--method", "ga,npo",
                    "--max-steps", 2, "--batch-size", 4, "--fractions", "0.5,1",
                    "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"circuits": 99.0, "grad_norm": 0.25}))
    out = tmp_path / "v"
    result = invoke("validate", "--circuits", pipeline / "circuits", "--outcomes",
                    pipeline / "unlearn", "--baselines", pipeline / "baselines", "--k", 2,
                    "--sizes", "8,12", "--n-boot", 50, "--pools", 2, "--pilots", tmp_path / "p",
                    "--prices", prices, "--out", out)
    assert result.exit_code == 0, result.output
    assert "forecast ladder" in result.output
    ladder = pd.read_csv(out / "ladder.csv").set_index(["method", "outcome", "estimate"])
    ladder = ladder.sort_index()
    row = ladder.loc[("npo", "nll_after")]
    assert {"pilot_50", "pilot_100", "forecast_pilot_100", "loss", "cud"} <= set(row.index)
    assert row.loc["pilot_100", "steps"] == "2 of 2"
    assert 0 < row.loc["pilot_50", "seconds_per_sample"] < row.loc["pilot_100",
                                                                    "seconds_per_sample"]
    assert 0 < row.loc["cud", "seconds_per_sample"] < 99    # measured, not the file's
    assert row.loc["loss", "seconds_per_sample"] > 0
    assert row.loc["pilot_100", "share_of_method"] > 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"loss": "fast"}))
    result = invoke("validate", "--circuits", pipeline / "circuits", "--outcomes",
                    pipeline / "unlearn", "--prices", bad, "--out", tmp_path / "w")
    assert result.exit_code == 2 and "bad.json" in result.output and "loss" in result.output
