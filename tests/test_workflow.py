"""The main job end to end on a tiny model (quick preset), its config files, and resuming."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
from typer.testing import CliRunner

from cud.config import RunConfig, load_config, with_preset
from cud.errors import ConfigError
from cud.models import tiny_model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    lm = tiny_model("llama", seed=0, num_hidden_layers=3)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_quick_run_ends_with_the_report(model_folder, tmp_path):
    from cud.cli import app

    config = tmp_path / "run.toml"
    config.write_text(f'preset = "quick"\nmodel = "{model_folder}"\nout = "{tmp_path / "out"}"\n'
                      f'[finetune]\ncache_dir = "{tmp_path / "ft"}"\n')
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    html = out / "report" / "report.html"
    assert html.exists() and html.stat().st_size > 10_000
    run = json.loads((out / "run.json").read_text())
    assert set(run["seconds"]) == {"data", "model", "circuits", "unlearning", "pilots",
                                   "baselines", "validation", "analysis", "report"}
    assert run["config"]["preset"] == "quick"
    heldout = pd.read_parquet(out / "validation" / "heldout.parquet")
    assert {"cud", "loss", "random"} <= set(heldout["metric"])
    assert set(heldout["method"]) == {"graddiff", "npo"}
    study = json.loads((out / "validation" / "study.json").read_text())
    assert not set(study["held_out"]) & set(study["excluded"])
    scores = pd.read_parquet(out / "scores" / "scores.parquet")
    assert scores["cud"].between(0, 1).all()
    forget = pd.read_csv(out / "forget.csv")
    assert set(scores["id"]) == set(forget["id"])
    assert (out / "analysis").is_dir() and (out / "anchors").is_dir()
    # the forecast ladder: every method, the pilots and the forecasters, each at its price
    ladder = pd.read_csv(out / "validation" / "ladder.csv")
    assert set(ladder["method"]) == {"graddiff", "npo"}
    names = set(ladder["estimate"])
    assert {"cud", "loss", "grad_norm", "answer_length", "pilot_20", "forecast_pre"} <= names
    # the quick run's 4 steps put every pilot fraction on step 1: one pilot forecaster
    assert [n for n in names if n.startswith("forecast_pilot")] == ["forecast_pilot_2"]
    priced = ladder.set_index(["method", "outcome", "estimate"])["seconds_per_sample"]
    assert (priced.xs("answer_length", level="estimate") == 0).all()
    for name in ("loss", "grad_norm", "mrd", "cud", "pilot_20", "forecast_pre"):
        assert (priced.xs(name, level="estimate") > 0).all(), name
    assert (priced.xs("forecast_pre", level="estimate")
            > priced.xs("cud", level="estimate")).all()
    page = html.read_text()
    assert page.index("id='verdict'") < page.index('data-figure="forecast_ladder"') \
        < page.index('id="distribution"')

    # a second run reuses every stage's results (the same circuits, outcomes and scores) and,
    # asked for them now, adds the easy/hard split protocol on the held-out samples and a
    # strategy after the plain methods, compared with them in a table the report draws
    config.write_text('strategy = "reweight"\nretest = true\n' + config.read_text()
                      + '[study]\nsplit_method = "ga"\n')
    again = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert again.exit_code == 0, again.output
    assert pd.read_parquet(out / "scores" / "scores.parquet").equals(scores)
    assert "split" in json.loads((out / "run.json").read_text())["seconds"]
    # the retest measures the circuits again (seed + 1) without the faithfulness passes, which
    # only the first measurement's variants and report read
    first = pd.read_parquet(out / "circuits" / "samples.parquet")
    second = pd.read_parquet(out / "circuits-retest" / "samples.parquet")
    assert "faithfulness" in first.columns and set(second["id"]) == set(first["id"])
    assert not [c for c in second.columns if c.startswith("faithfulness")]
    retest = pd.read_csv(out / "validation" / "retest.csv").set_index("quantity")
    assert "cud test-retest spearman" in retest.index
    split = pd.read_parquet(out / "validation" / "split_forget.parquet")
    assert set(split.index) <= set(study["held_out"]) and len(split) >= 2
    assert set(pd.read_csv(out / "validation" / "split_summary.csv")["half"]) == {"easy", "hard"}
    assert "strategy" in json.loads((out / "run.json").read_text())["seconds"]
    manifest = json.loads((out / "strategy-reweight" / "unlearning.json").read_text())
    assert manifest["strategy"]["name"] == "reweight"
    assert manifest["strategy"]["difficulty"].endswith("scores.parquet:cud")
    comparison = pd.read_csv(out / "strategy-reweight" / "comparison.csv")
    assert list(comparison["method"]) == ["graddiff", "npo"]
    assert {"forgotten_plain", "forgotten_strategy", "forgotten_hard_plain",
            "forgotten_hard_strategy", "retain_rise_plain", "retain_rise_strategy",
            "mcnemar_p", "wilcoxon_p_nll_delta", "utility_plain"} <= set(comparison.columns)
    assert comparison["n_hard"].between(1, comparison["n"].max()).all()
    weights = pd.read_csv(out / "strategy-reweight" / "strategy.csv").set_index("id")
    assert weights["difficulty"].to_numpy() == pytest.approx(
        scores.set_index("id")["cud"].reindex(weights.index).to_numpy())
    assert 'id="strategy"' in (out / "report" / "report.html").read_text()


def test_config_files_and_their_errors(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("preset: quick\ncircuits:\n  n_edges: 30\nunlearning:\n  methods: [ga]\n")
    c = load_config(good)
    assert c.circuits.n_edges == 30 and c.unlearning.methods == ("ga",)
    assert c.data == "builtin:40" and c.circuits.steps == 2          # from the preset
    assert load_config(good, {"model": "m"}).model == "m"              # overrides win
    assert load_config().circuits == RunConfig().circuits
    cases = {
        "unknown.toml": ("[circuits]\nn_edge = 3\n", "unknown key 'circuits.n_edge'"),
        "type.toml": ("[circuits]\nn_edges = 'many'\n", "circuits.n_edges: expected an integer"),
        "bad.toml": ("model = \n", "invalid TOML"),
        "bad.yaml": ("a: [1,\n", "invalid YAML"),
        "list.yaml": ("- 1\n", "top level must be a table"),
        "preset.toml": ("preset = 'fast'\n", "unknown preset 'fast'"),
        "section.toml": ("circuits = 3\n", "[circuits] must be a table"),
        "config.ini": ("x=1\n", "unknown config format"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(path)
        assert name in str(pytest.raises(ConfigError, load_config, path).value)
    (tmp_path / "binary.toml").write_bytes(b"model = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "binary.toml")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_tofu_spec_reads_forget_and_retain(tmp_path):
    from cud.data.prepare import load_run_data

    def load_forget_retain(config):
        data = load_run_data(config.data)
        return data.forget, data.retain

    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(6)]
    (tmp_path / "forget01.json").write_text(json.dumps(rows[:3]))
    (tmp_path / "retain99.json").write_text("\n".join(json.dumps(r) for r in rows[3:]))
    forget, retain = load_forget_retain(RunConfig(data=f"tofu:{tmp_path}:forget01:retain99"))
    assert [s.answer for s in forget] == ["A0.", "A1.", "A2."] and len(retain) == 3
    assert all(s.extra.get("perturbed_answer") for s in forget)
    with pytest.raises(Exception, match="no such TOFU folder"):
        load_forget_retain(RunConfig(data=f"tofu:{tmp_path / 'nope'}"))


@pytest.mark.parametrize("changes, message", [
    ({"circuits": {"n_edges": 0}}, "n_edges must be at least 1"),
    ({"circuits": {"method": "xx"}}, "unknown attribution method 'xx'"),
    ({"unlearning": {"methods": ["xx"]}}, r"\[unlearning\]: unknown unlearning method 'xx'"),
    ({"unlearning": {"hyperparameters": "slow"}}, "unknown hyperparameter table 'slow'"),
    ({"study": {"distance": "l2"}}, "unknown distance 'l2'"),
    ({"circuits": {"ablation": "mean"}}, r"\[circuits\]: the mean ablation needs a reference"),
    ({"strategy": "xx"}, "unknown strategy 'xx'"),
    ({"unlearning": {"strategy": "focus"}}, "in a run the methods run plain"),
    ({"preset": "paper", "unlearning": {"methods": ["ga"]}, "circuits": {"n_edges": -1}},
     "n_edges must be at least 1"),
])
def test_bad_settings_fail_before_any_stage(changes, message, tmp_path):
    import cud

    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=message):
        cud.run({**changes, "out": str(out)})
    assert not out.exists()


def test_run_json_keeps_each_sitting_of_a_resumed_run(tmp_path):
    """A run finished over several sittings keeps what each stage cost when it did its work; a
    rerun with another configuration starts its own account."""
    from cud.progress import silent
    from cud.workflow import RunResult, _Clock

    config = with_preset("quick")

    def sitting(cfg, seconds):
        clock = _Clock(RunResult(out=tmp_path, config=cfg), silent)
        clock.result.seconds.update(seconds)
        clock.write(tmp_path)
        return json.loads((tmp_path / "run.json").read_text())

    first = sitting(config, {"circuits": 100.0, "unlearning": 50.0})
    assert first["sittings"] == [{"circuits": 100.0, "unlearning": 50.0}]
    second = sitting(config, {"circuits": 2.0, "unlearning": 30.0, "report": 5.0})
    assert second["seconds"] == {"circuits": 2.0, "unlearning": 30.0, "report": 5.0}
    assert len(second["sittings"]) == 2
    assert second["seconds_all_sittings"] == {"circuits": 102.0, "unlearning": 80.0,
                                              "report": 5.0}
    assert second["total_seconds_all_sittings"] == 187.0
    other = sitting(replace(config, seed=1), {"circuits": 7.0})
    assert other["sittings"] == [{"circuits": 7.0}]
    assert other["seconds_all_sittings"] == {"circuits": 7.0}

    # a run.json from before sittings were kept counts as one sitting
    (tmp_path / "run.json").write_text(json.dumps({
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "seconds": {"circuits": 40.0}}))
    assert sitting(config, {"circuits": 1.0})["seconds_all_sittings"] == {"circuits": 41.0}
    (tmp_path / "run.json").write_text("{not json")
    assert sitting(config, {"circuits": 1.0})["sittings"] == [{"circuits": 1.0}]
