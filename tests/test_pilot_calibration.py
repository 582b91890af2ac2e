"""Pilots, prices and calibration on a tiny model taught a few facts: a pilot at fraction f is
the full run's trajectory at the same step (same seed), every estimate's price is recorded where
it is made, calibration picks the rate a brute-force grid picks, and a method whose retain NLL
rises past the budget is flagged collapsed in the outcomes, the study and the report."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cud.circuits import CircuitSettings, find_circuits
from cud.data import encode_samples, load_qa
from cud.data.prepare import split_forget_retain
from cud.difficulty.baselines import BaselineSettings, baselines_to_folder
from cud.difficulty.pilot import PilotSettings, pilots_to_folder, read_pilots
from cud.errors import ConfigError, StoreError
from cud.models.tiny import tiny_model
from cud.prices import read_prices
from cud.unlearning import TrainConfig, unlearn
from cud.unlearning.calibration import calibrate, grid_rates, held_retain
from cud.unlearning.finetune import teach
from cud.unlearning.folder import UnlearningSettings, method_flags, unlearn_to_folder
from cud.unlearning.loop import train
from cud.unlearning.methods import make_method
from cud.unlearning.pilot import pilot, pilot_steps
from cud.unlearning.run import retain_outcomes

# a linear decay after warm-up: a pilot that shortened the schedule would take other steps
STEPS = TrainConfig(lr=3e-3, max_steps=10, batch_size=4, warmup=2, schedule="linear",
                    weight_decay=0.0)


@pytest.fixture(scope="module")
def taught(single_thread):
    """A tiny llama that has memorised 16 built-in facts."""
    lm = tiny_model("llama", seed=0)
    samples = load_qa("builtin:16")
    teach(lm.model, encode_samples(lm.tokenizer, samples),
          TrainConfig(lr=1e-2, epochs=60, batch_size=8, weight_decay=0.0, warmup=0.05),
          pad_token_id=lm.pad_token_id)
    forget, retain = split_forget_retain(samples, 0.5)
    return lm, forget, retain


# --- pilots ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, hyper", [("graddiff", None), ("npo", None),
                                           ("rmu", {"coefficient": 5.0})])
def test_a_pilot_is_the_full_run_up_to_its_step(taught, method, hyper):
    lm, forget, retain = taught
    full = unlearn(lm, forget, retain, method=method, train_config=STEPS, eval_every=1,
                   hyperparameters=hyper, metrics=("nll",))
    result = pilot(lm, forget, retain, method=method, fractions=(0.1, 0.25, 0.5),
                   train_config=STEPS, hyperparameters=hyper)
    assert result.steps == {0.1: 1, 0.25: 3, 0.5: 5} and result.total_steps == 10
    trajectory = full.trajectory.pivot(index="id", columns="step", values="nll")
    for fraction, step in result.steps.items():
        mine = result.trajectory[result.trajectory["step"] == step].set_index("id")["nll"]
        np.testing.assert_array_equal(mine.to_numpy(), trajectory[step].reindex(mine.index))
        rise = trajectory[step] - trajectory[0]
        np.testing.assert_array_equal(result.rise[f"pilot_{fraction * 100:g}"].to_numpy(),
                                      rise.reindex(result.rise.index).to_numpy())
    # it stopped at the largest fraction: nothing after step 5 was trained or evaluated
    assert sorted(result.trajectory["step"].unique()) == [0, 1, 3, 5]
    assert all(v > 0 for v in result.seconds.values())
    assert result.seconds[0.1] < result.seconds[0.5]


def test_stopping_early_keeps_the_full_runs_schedule(taught):
    lm, forget, _ = taught
    method = make_method("ga")
    enc = encode_samples(lm.tokenizer, forget)

    def lrs(config=STEPS, **kw):
        log = train(copy.deepcopy(lm.model), method.loss, enc, None, config,
                    pad_token_id=lm.pad_token_id, **kw)
        return [row["lr"] for row in log.steps], log

    whole, _ = lrs()
    first, log = lrs(stop_after=4)
    assert first == whole[:4] and log.stopped_at == 4 and log.total_steps == 10
    # a run of only 4 steps would decay to 0 within them: not what the pilot does
    four, _ = lrs(replace(STEPS, max_steps=4))
    assert four != first


def test_pilot_steps_round_half_up_and_never_below_one():
    assert pilot_steps(14, (0.02, 0.05, 0.1, 0.2)) == {0.02: 1, 0.05: 1, 0.1: 1, 0.2: 3}
    assert pilot_steps(400, (0.02, 0.05)) == {0.02: 8, 0.05: 20}
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        pilot_steps(10, (0.0, 0.5))
    with pytest.raises(ConfigError):
        PilotSettings(fractions=(1.5,))


def test_the_pilot_stage_records_prices_resumes_and_refuses_other_settings(taught, tmp_path):
    lm, forget, retain = taught
    unlearning = UnlearningSettings(methods=("graddiff", "npo"), max_steps=10, batch_size=4,
                                    lr=3e-3, utility=False)
    settings = PilotSettings(fractions=(0.1, 0.3))
    run = pilots_to_folder(lm, forget, retain, tmp_path / "p", settings, unlearning)
    for m in ("graddiff", "npo"):
        assert list(run.scores[m].columns) == ["pilot_10", "pilot_30"]
        assert set(run.scores[m].index) == {s.id for s in forget}
        assert run.steps[m] == {"pilot_10": 1, "pilot_30": 3} and run.total_steps[m] == 10
        assert 0 < run.prices[m]["pilot_10"] < run.prices[m]["pilot_30"]
        stored = json.loads((tmp_path / "p" / m / "settings.json").read_text())
        assert stored["request"]["train"]["lr"] == 3e-3
    again = pilots_to_folder(lm, forget, retain, tmp_path / "p", settings, unlearning)
    assert all(again.reused.values())
    assert again.scores["npo"].equals(run.scores["npo"])
    assert read_pilots(tmp_path / "p").prices == run.prices
    with pytest.raises(StoreError, match="other settings"):
        pilots_to_folder(lm, forget, retain, tmp_path / "p", settings,
                         replace(unlearning, lr=1e-3))
    with pytest.raises(StoreError, match="other settings"):
        pilots_to_folder(lm, forget, retain, tmp_path / "p", PilotSettings(fractions=(0.5,)),
                         unlearning)
    calibrated = replace(unlearning, calibrate=("npo",))
    with pytest.raises(ConfigError, match="calibrated"):
        pilots_to_folder(lm, forget, retain, tmp_path / "q", settings, calibrated)


# --- prices ----------------------------------------------------------------------------------

def test_baselines_and_circuits_record_their_price(taught, tmp_path):
    lm, forget, _ = taught
    settings = BaselineSettings(mrd_k=2)
    baselines_to_folder(lm, forget, tmp_path / "b", settings)
    prices = read_prices(tmp_path / "b")
    assert set(prices) == set(settings.metrics)
    assert prices["random"] == 0
    for metric in ("loss", "min_k_prob", "grad_norm", "mrd"):
        assert prices[metric] > 0, metric
    assert prices["loss"] == prices["prob"] == prices["exact_mem"]   # one shared pass
    # read back from the cache, a metric keeps the price of the run that made it
    baselines_to_folder(lm, forget, tmp_path / "b", settings)
    assert read_prices(tmp_path / "b") == prices

    small = tiny_model("llama", seed=1)
    find_circuits(small, forget[:4], tmp_path / "c", CircuitSettings(steps=2, n_edges=12))
    first = json.loads((tmp_path / "c" / "prices.json").read_text())["circuits"]
    assert first["samples"] == 4 and first["seconds"] > 0
    find_circuits(small, forget, tmp_path / "c", CircuitSettings(steps=2, n_edges=12))
    both = json.loads((tmp_path / "c" / "prices.json").read_text())["circuits"]
    assert both["samples"] == len(forget) and both["seconds"] > first["seconds"]


# --- calibration -----------------------------------------------------------------------------

GRID = (1.0, 0.5, 0.25, 0.1)


def _brute_force(lm, forget, retain, held, method, config, budget):
    """Every rate of the grid, unlearned fully, its retain NLL rise on the held part."""
    before = retain_outcomes(lm, held)["nll"].mean()
    rises = {}
    for rate in grid_rates(config.lr, GRID):
        result = unlearn(lm, forget, retain, method=method, metrics=("nll",),
                         train_config=replace(config, lr=rate))
        rises[rate] = float(retain_outcomes(result.model, held)["nll"].mean() - before)
    within = [rate for rate, rise in rises.items() if rise <= budget]
    return rises, (max(within) if within else None)


def test_calibration_picks_the_rate_a_brute_force_grid_picks(taught):
    lm, forget, retain = taught
    trained, held = held_retain(retain, 0.25, seed=0)
    assert held and not {s.id for s in held} & {s.id for s in trained}
    config = replace(STEPS, lr=2e-2)
    rises, _ = _brute_force(lm, forget, trained, held, "ga", config, 0)
    ordered = sorted(rises.values())
    assert ordered[0] < ordered[-1]
    # a budget between the rises, so that some rates pass and some do not
    budget = (ordered[1] + ordered[2]) / 2
    _, expected = _brute_force(lm, forget, trained, held, "ga", config, budget)
    found = calibrate(lm, forget, trained, held, method="ga", train_config=config, grid=GRID,
                      budget=budget)
    assert found.chosen == pytest.approx(expected) and not found.collapsed
    assert found.rises[found.chosen] <= budget
    assert all(rises[r] > budget for r in found.rises if r > found.chosen)
    assert found.runs == len(found.rises) <= len(GRID)
    # resumed from the rises already measured, nothing is trained again
    again = calibrate(lm, forget, trained, held, method="ga", train_config=config, grid=GRID,
                      budget=budget, known=found.rises)
    assert again.chosen == found.chosen and again.runs == 0
    # no rate within budget: the smallest is used and the method is collapsed
    tight = calibrate(lm, forget, trained, held, method="ga", train_config=config, grid=GRID,
                      budget=min(ordered) / 2 if min(ordered) > 0 else 1e-9)
    assert tight.collapsed and tight.chosen == pytest.approx(min(rises))


def test_a_collapsed_method_is_flagged_and_a_calibrated_one_is_used_at_its_rate(taught,
                                                                                tmp_path):
    lm, forget, retain = taught
    out = tmp_path / "u"
    settings = UnlearningSettings(methods=("ga", "graddiff"), lr=2e-2, max_steps=10,
                                  batch_size=4, utility=False, calibrate=("graddiff",),
                                  calibration_grid=GRID, calibration_held=0.25,
                                  retain_budget=0.05)
    run = unlearn_to_folder(lm, forget, retain, out, settings)
    summary = run.summary.set_index("method")
    ga = json.loads((out / "ga" / "settings.json").read_text())
    assert ga["retain_nll_delta_mean"] > 0.05          # gradient ascent wrecked the retain set
    assert ga["collapsed"] and summary.loc["ga", "collapsed"]
    assert ga["collapse_measure"] == "retain set"
    gd = json.loads((out / "graddiff" / "settings.json").read_text())
    cal = gd["calibration"]
    assert gd["lr"] == cal["chosen"] and summary.loc["graddiff", "lr"] == cal["chosen"]
    assert gd["collapsed"] == cal["collapsed"] == (gd["retain_held_nll_rise"] > 0.05)
    held_ids = set(cal["held_ids"])
    assert held_ids and gd["n_retain"] == len(retain) - len(held_ids)   # never trained on
    flags = method_flags(out)
    assert flags["ga"]["collapsed"] and flags["graddiff"]["calibrated"]
    again = unlearn_to_folder(lm, forget, retain, out, settings)
    assert again.summary["reused"].all()
    with pytest.raises(StoreError):
        unlearn_to_folder(lm, forget, retain, out, replace(settings, calibration_held=0.5))
    # the pilot of a calibrated method runs at its calibrated rate
    from cud.difficulty.pilot import calibrated_rates
    rates = calibrated_rates(out)
    assert rates == {"graddiff": cal["chosen"]}
    pilots = pilots_to_folder(lm, forget, retain, tmp_path / "p", PilotSettings(fractions=(0.2,)),
                              replace(settings, methods=("graddiff",)), rates=rates)
    stored = json.loads((tmp_path / "p" / "graddiff" / "settings.json").read_text())
    assert stored["request"]["train"]["lr"] == cal["chosen"]
    assert not pilots.reused["graddiff"]


@pytest.mark.parametrize("budget, trainings", [(1e6, 1), (1e-9, len(GRID))])
def test_a_calibrated_method_is_not_trained_again_at_its_chosen_rate(taught, tmp_path,
                                                                     monkeypatch, budget,
                                                                     trainings):
    """The calibration's run at the chosen rate stands for the method's training: one training
    per rate tried (the first rate within a huge budget; every rate, the smallest chosen, when
    none is within a tiny one), none more, and the outcomes and trajectory equal those of the
    method trained afresh at the chosen rate on the same retain samples."""
    import cud.unlearning.run as run_module
    lm, forget, retain = taught
    calls = []
    real = run_module.train          # the loop, as every unlearning training calls it

    def counted(*args, **kwargs):
        calls.append(args[4].lr)
        return real(*args, **kwargs)
    monkeypatch.setattr(run_module, "train", counted)
    settings = UnlearningSettings(methods=("graddiff",), lr=2e-2, max_steps=6, batch_size=4,
                                  eval_every=2, utility=False, calibrate=("graddiff",),
                                  calibration_grid=GRID, calibration_held=0.25,
                                  retain_budget=budget)
    unlearn_to_folder(lm, forget, retain, tmp_path / "u", settings)
    stored = json.loads((tmp_path / "u" / "graddiff" / "settings.json").read_text())
    chosen = stored["calibration"]["chosen"]
    assert len(calls) == trainings and calls[-1] == pytest.approx(chosen)
    assert stored["train_seconds"] > 0 and stored["seconds"] >= stored["train_seconds"]
    monkeypatch.setattr(run_module, "train", real)
    trained, _ = held_retain(retain, 0.25, seed=0)
    fresh = unlearn(lm, forget, trained, method="graddiff", eval_every=2,
                    train_config=replace(settings.train_config("graddiff"), lr=chosen),
                    batch_size=settings.eval_batch_size,
                    generation_budget=settings.generation_budget)
    outcomes = pd.read_parquet(tmp_path / "u" / "graddiff" / "outcomes.parquet")
    expected = fresh.per_sample()
    pd.testing.assert_frame_equal(outcomes[expected.columns], expected, check_dtype=False)
    trajectory = pd.read_csv(tmp_path / "u" / "graddiff" / "trajectory.csv")
    assert sorted(trajectory["step"].unique()) == [0, 2, 4, 6]
    np.testing.assert_allclose(trajectory["nll"].to_numpy(),
                               fresh.trajectory["nll"].to_numpy(), rtol=0, atol=1e-6)


def test_a_budget_change_reflags_a_reused_method(taught, tmp_path):
    lm, forget, retain = taught
    settings = UnlearningSettings(methods=("ga",), lr=2e-2, max_steps=6, batch_size=4,
                                  utility=False, retain_budget=1e-6)
    first = unlearn_to_folder(lm, forget, retain, tmp_path / "u", settings)
    assert first.summary["collapsed"].all()
    second = unlearn_to_folder(lm, forget, retain, tmp_path / "u",
                               replace(settings, retain_budget=1e6))
    assert second.summary["reused"].all() and not second.summary["collapsed"].any()
    assert not method_flags(tmp_path / "u")["ga"]["collapsed"]


def test_a_folder_written_before_the_flag_is_judged_by_the_default_budget(tmp_path):
    """The committed TOFU RMU (retain NLL +8.70, settings.json without a flag) is collapsed."""
    for name, rise in (("rmu", 8.70), ("npo", 0.11)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "settings.json").write_text(json.dumps(
            {"method": name, "retain_nll_delta_mean": rise, "train": {"lr": 1e-4}}))
    flags = method_flags(tmp_path)
    assert flags["rmu"]["collapsed"] and not flags["npo"]["collapsed"]
    assert flags["rmu"]["retain_budget"] == 1.0 and flags["rmu"]["lr"] == 1e-4


def test_pilot_and_calibration_settings_in_a_config_file(tmp_path):
    from cud.config import load_config
    path = tmp_path / "c.toml"
    path.write_text('[unlearning]\nmethods = ["graddiff", "rmu"]\ncalibrate = ["rmu"]\n'
                    'retain_budget = 0.5\n[pilots]\nfractions = [0.1, 0.3]\n')
    config = load_config(path)
    assert config.unlearning.calibrate == ("rmu",) and config.unlearning.retain_budget == 0.5
    assert config.pilots.fractions == (0.1, 0.3) and config.pilots.enabled
    path.write_text('[pilots]\nfractions = [0.1, 2]\n')
    with pytest.raises(ConfigError, match="pilots.*fractions"):
        load_config(path)
    path.write_text('[unlearning]\ncalibrate = ["rmu"]\n')
    with pytest.raises(ConfigError, match="not among the methods"):
        load_config(path)


def test_calibration_settings_are_checked():
    with pytest.raises(ConfigError, match="not among the methods"):
        UnlearningSettings(methods=("ga",), calibrate=("npo",))
    with pytest.raises(ConfigError, match="retain_budget"):
        UnlearningSettings(retain_budget=0)
    with pytest.raises(ConfigError, match="calibration_held"):
        UnlearningSettings(calibration_held=1.0)
    with pytest.raises(ConfigError, match="calibration_grid"):
        UnlearningSettings(calibration_grid=(1.0, -0.5))


# --- the commands ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-pilot")
    lm = tiny_model("llama", seed=0)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def test_unlearn_calibrate_then_pilot_then_validate_commands(tiny_folder, tmp_path):
    from cud.cli import app
    runner = CliRunner()
    common = ["--model", tiny_folder, "--data", "builtin:16", "--max-steps", "4",
              "--batch-size", "4"]
    result = runner.invoke(app, ["unlearn", *common, "--method", "ga,npo", "--calibrate", "npo",
                                 "--calibration-grid", "1,0.5", "--no-utility",
                                 "--out", str(tmp_path / "u")])
    assert result.exit_code == 0, result.output
    cal = json.loads((tmp_path / "u" / "npo" / "settings.json").read_text())["calibration"]
    assert len(cal["rises"]) >= 1
    result = runner.invoke(app, ["pilot", *common, "--method", "ga,npo", "--fractions", "0.25,0.5",
                                 "--unlearning", str(tmp_path / "u"),
                                 "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "pilot_25" in result.output
    npo = json.loads((tmp_path / "p" / "npo" / "settings.json").read_text())
    assert npo["request"]["train"]["lr"] == cal["chosen"]
    bad = runner.invoke(app, ["pilot", *common, "--fractions", "0,2", "--out",
                              str(tmp_path / "x")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "fractions" in bad.output
