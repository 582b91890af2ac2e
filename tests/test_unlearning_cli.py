"""The finetune / unlearn / baselines commands on a tiny model saved as a folder."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from cud.cli import app
from cud.models.tiny import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-cli")
    lm = tiny_model("llama", seed=0)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_finetune_command_caches(tiny_folder, tmp_path):
    args = ("finetune", "--model", tiny_folder, "--data", "builtin:8", "--epochs", 10, "--lr",
            1e-2, "--batch-size", 4, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "ft")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "trained in" in first.output
    assert (tmp_path / "ft" / "memorisation.parquet").is_file()
    second = invoke(*args)
    assert second.exit_code == 0 and "reused" in second.output


def test_unlearn_command_writes_tables(tiny_folder, tmp_path):
    out = tmp_path / "u"
    result = invoke("unlearn", "--model", tiny_folder, "--data", "builtin:16", "--method",
                    "ga,npo", "--max-steps", 2, "--batch-size", 4, "--eval-every", 1,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "before.parquet").is_file() and (out / "before.csv").is_file()
    for method in ("ga", "npo"):
        table = pd.read_parquet(out / method / "outcomes.parquet")
        assert {"nll_delta", "truth_ratio_delta", "steps_to_forget"} <= set(table.columns)
        assert len(table) == len(pd.read_parquet(out / "before.parquet"))
        traj = pd.read_csv(out / method / "trajectory.csv")
        assert sorted(traj["step"].unique()) == [0, 1, 2]
        settings = json.loads((out / method / "settings.json").read_text())
        assert settings["method"] == method and settings["train"]["max_steps"] == 2
    agreement = pd.read_csv(out / "agreement_nll_delta.csv", index_col=0)
    assert list(agreement.columns) == ["ga", "npo"]


def test_baselines_command(tiny_folder, tmp_path):
    out = tmp_path / "b"
    result = invoke("baselines", "--model", tiny_folder, "--data", "builtin:6", "--mrd-k", 2,
                    "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "baselines.parquet")
    assert {"loss", "mrd", "grad_norm", "min_k_prob", "random"} <= set(table.columns)


def test_unlearn_command_errors_are_one_line(tiny_folder, tmp_path):
    result = invoke("unlearn", "--model", tiny_folder, "--data", "builtin:8", "--method", "nope",
                    "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "unknown" in result.output and "Traceback" not in result.output
