"""The forecast ladder on planted data: no held-out id reaches a forecaster's fit (and changing
held-out outcomes changes no forecast), a forecaster combines what single estimates carry apart,
single estimates are judged exactly as the study judges them, prices add up per computation,
the verdict names the best forecast at each price, and a collapsed method is flagged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cud.circuits.graph import Graph
from cud.circuits.selection import SelectionSettings
from cud.difficulty import ladder as ladder_module
from cud.difficulty.forecast import (HeldOutLeak, fit_forecaster, forecaster_inputs, tier_of)
from cud.difficulty.ladder import (ForecastInputs, PoolView, Prices, best_per_tier,
                                   ladder_table, pool_forecasts)
from cud.difficulty.study import StudySettings, run_study

GRAPH = Graph(n_layers=2, n_heads=4)
SEL = SelectionSettings(n_edges=15)
N = 160
SETTINGS = StudySettings(k=4, sizes=(15,), n_boot=200, n_perm=100, pools=3,
                         variant_sizes=(15, 30), node_k=6, cross_method=True)


def _ids(n=N):
    return [f"author{i // 5:03d}.f{i % 5}" for i in range(n)]


@pytest.fixture(scope="module")
def planted():
    """Difficulty = a + b: baseline ``loss`` carries a, ``grad_norm`` carries b, each alone
    about half of it; the circuits carry a weak trace; ``ga`` and ``npo`` share it, ``npo``
    with its own noise. The pilot of each method is a noisy early look at its own outcome."""
    rng = np.random.default_rng(1)
    ids = _ids()
    a, b = rng.normal(size=N), rng.normal(size=N)
    t = a + b
    g = torch.Generator().manual_seed(0)
    easy, hard = torch.randn(GRAPH.n_edges, generator=g), torch.randn(GRAPH.n_edges, generator=g)
    w = torch.tensor((t - t.min()) / np.ptp(t), dtype=torch.float32)
    scores = (1 - w)[:, None] * easy + w[:, None] * hard \
        + 1.5 * torch.randn(N, GRAPH.n_edges, generator=g)
    index = pd.Index(ids, name="id")
    outcomes = {m: pd.DataFrame({"nll_after": -t + noise * rng.normal(size=N)}, index=index)
                for m, noise in (("ga", 0.2), ("npo", 0.4))}
    for table in outcomes.values():
        table["nll_delta"] = table["nll_after"] - 0.1
    baselines = pd.DataFrame({"loss": a + 0.3 * rng.normal(size=N),
                              "grad_norm": b + 0.3 * rng.normal(size=N),
                              "mrd": rng.normal(size=N)}, index=index)
    info = pd.DataFrame({"question_type": [f"t{i % 4}" for i in range(N)],
                         "n_answer_tokens": rng.integers(3, 20, N).astype(float),
                         "question_length": rng.integers(5, 12, N).astype(float)}, index=index)
    pilots = {m: pd.DataFrame({"pilot_5": o["nll_after"] + 1.5 * rng.normal(size=N),
                               "pilot_20": o["nll_after"] + 0.5 * rng.normal(size=N)},
                              index=index) for m, o in outcomes.items()}
    prices = Prices(estimates={"loss": 0.01, "prob": 0.01, "exact_mem": 0.01, "grad_norm": 0.05,
                               "mrd": 0.3, "circuits": 2.0},
                    pilots={m: {"pilot_5": 0.4, "pilot_20": 1.1} for m in outcomes},
                    pilot_steps={m: {"pilot_5": 1, "pilot_20": 4} for m in outcomes},
                    total_steps={m: 20 for m in outcomes}, methods={"ga": 10.0, "npo": 11.0})
    flags = {"ga": {"collapsed": False}, "npo": {"collapsed": True, "retain_nll_rise": 8.7,
                                                 "collapse_measure": "retain set",
                                                 "retain_budget": 1.0}}
    return ids, scores, outcomes, baselines, info, ForecastInputs(pilots, prices, flags)


@pytest.fixture(scope="module")
def study(planted):
    ids, scores, outcomes, baselines, info, forecast = planted
    return run_study(ids, scores, GRAPH, SEL, outcomes, baselines=baselines, info=info,
                     settings=SETTINGS, forecast=forecast)


def test_no_held_out_id_reaches_a_fit(planted, monkeypatch):
    ids, scores, outcomes, baselines, info, forecast = planted
    seen = []
    real = ladder_module.fit_forecaster

    def spy(features, target, *, train, predict, banned=(), kind="ridge"):
        train, predict = list(train), list(predict)
        seen.append((set(train), set(predict), set(banned)))
        return real(features, target, train=train, predict=predict, banned=banned, kind=kind)

    monkeypatch.setattr(ladder_module, "fit_forecaster", spy)
    study = run_study(ids, scores, GRAPH, SEL, outcomes, baselines=baselines, info=info,
                      settings=SETTINGS, forecast=forecast)
    held_per_pool = [set(p["held_out"]) for p in study.pools]
    assert len(seen) >= 2 * 2 * 3 * 4        # methods x outcomes x pools x forecasters
    for train, predict, banned in seen:
        held = next(h for h in held_per_pool if h == predict)
        assert banned == held and not train & held and len(train) >= 8
    # and the gate itself refuses one
    with pytest.raises(HeldOutLeak):
        fit_forecaster(baselines, -outcomes["ga"]["nll_after"], train=ids[:20],
                       predict=ids[20:], banned=ids[15:])


def test_held_out_outcomes_change_no_forecast(planted):
    """The proof that matters: scramble every held-out outcome and the forecasts of the
    held-out samples stay exactly the same."""
    ids, _, outcomes, baselines, info, forecast = planted
    rng = np.random.default_rng(5)
    pool, held = ids[:40], ids[40:]
    scores = baselines.join(info[["question_length"]]).join(forecast.pilots["ga"])
    view = PoolView(0, pool, pool[:4], pool[4:8], held, scores)
    truth = -outcomes["ga"]["nll_after"]
    scrambled = truth.copy()
    scrambled[held] = rng.normal(size=len(held)) * 100
    a, _ = pool_forecasts(view, truth, "ridge")
    b, _ = pool_forecasts(view, scrambled, "ridge")
    assert list(a.columns) == ["forecast_free", "forecast_pass", "forecast_pilot_5",
                               "forecast_pilot_20"]
    pd.testing.assert_frame_equal(a, b)
    changed = truth.copy()
    changed[pool[10:20]] = rng.normal(size=10) * 100      # a pool outcome does change it
    c, _ = pool_forecasts(view, changed, "ridge")
    assert not a["forecast_pass"].equals(c["forecast_pass"])


def test_a_forecaster_combines_what_single_estimates_carry_apart(study):
    rows = study.ladder[(study.ladder["outcome"] == "nll_after")
                        & (study.ladder["method"] == "ga")].set_index("estimate")
    assert rows.loc["forecast_pass", "spearman"] > rows.loc["loss", "spearman"] + 0.15
    assert rows.loc["forecast_pass", "spearman"] > rows.loc["grad_norm", "spearman"] + 0.15
    assert rows.loc["forecast_pass", "diff_lo"] > 0            # beats the best single baseline
    assert rows.loc["forecast_pass", "versus"] in ("loss", "grad_norm")
    assert rows.loc["pilot_20", "spearman"] > rows.loc["pilot_5", "spearman"]


def test_single_estimates_are_judged_as_the_study_judges_them(study):
    h = study.heldout.set_index(["metric", "method", "outcome"])
    ladder = study.ladder.set_index(["estimate", "method", "outcome"])
    for key in [("loss", "ga", "nll_after"), ("grad_norm", "npo", "nll_delta"),
                ("answer_length", "ga", "nll_delta")]:
        for col in ("spearman", "spearman_sd", "spearman_lo", "spearman_hi", "n", "pools"):
            assert ladder.loc[key, col] == pytest.approx(h.loc[key, col]), (key, col)


def test_prices_add_up_per_computation(study, planted):
    rows = study.ladder[(study.ladder["outcome"] == "nll_after")
                        & (study.ladder["method"] == "ga")].set_index("estimate")
    price = rows["seconds_per_sample"]
    assert price["answer_length"] == 0 and price["question_type"] == 0
    assert price["forecast_free"] == 0
    assert price["forecast_pass"] == pytest.approx(0.01 + 0.05 + 0.3)
    cud = price["cud"]
    assert cud > 2.0 and price["forecast_pre"] == pytest.approx(0.36 + cud)
    assert price["forecast_pilot_20"] == pytest.approx(price["forecast_pre"] + 1.1)
    assert rows.loc["pilot_5", "steps"] == "1 of 20"
    assert rows.loc["pilot_20", "share_of_method"] == pytest.approx(1.1 / 10.0)
    assert rows.loc["forecast_pilot_20", "tier"] == "pilot"
    assert rows.loc["cud", "tier"] == "circuits" and rows.loc["mrd", "tier"] == "one pass"


def test_every_method_is_seen_with_its_own_anchors(study):
    cross = study.cross_method
    for m in ("ga", "npo"):
        own = cross[(cross["anchors_from"] == m) & (cross["method"] == m)
                    & (cross["outcome"] == "nll_after")]["spearman"].iloc[0]
        row = study.ladder[(study.ladder["estimate"] == "cud") & (study.ladder["method"] == m)
                           & (study.ladder["outcome"] == "nll_after")].iloc[0]
        assert row["spearman"] == pytest.approx(own)


def test_the_verdict_names_the_best_at_each_price_and_flags_a_collapse(study, tmp_path):
    best = best_per_tier(study.ladder, "nll_after")
    ga = best[best["method"] == "ga"]
    assert list(ga["tier_label"]) == ["free", "one pass", "circuits", "pilot at 5 %",
                                      "pilot at 20 %"]
    assert (np.diff(ga["spearman"].to_numpy()) >= 0).all()     # a price buys at least as much
    assert study.ladder.groupby("method")["collapsed"].all().to_dict() == {"ga": False,
                                                                            "npo": True}
    from cud.report.html import ReportInputs, build_report
    study.save(tmp_path / "v")
    from cud.difficulty.study import read_study
    again = read_study(tmp_path / "v")
    assert again.flags["npo"]["collapsed"] and not again.ladder.empty
    report = build_report(ReportInputs(study=again), tmp_path / "r")
    page = report.html.read_text()
    verdict = page[page.index("id='verdict'"):page.index('data-figure="forecast_ladder"')]
    assert "Collapsed" in verdict and "npo" in verdict and "8.7" in verdict
    assert "pilot at 20 %" in verdict and "forecast_pass" in verdict
    assert "forecast_ladder" in report.figures


def test_tiers_and_forecaster_inputs():
    assert tier_of("question_length") == "free" and tier_of("qtype=t1") == "free"
    assert tier_of("min_k_prob") == "one pass" and tier_of("s_edge_span_mean") == "circuits"
    assert tier_of("cud_set_knn") == "circuits" and tier_of("pilot_2") == "pilot"
    inputs = forecaster_inputs(["answer_length", "loss", "cud", "s_n_nodes", "pilot_20",
                                "pilot_5", "selected", "random"])
    assert inputs["forecast_free"] == ["answer_length"]
    assert inputs["forecast_pilot_5"] == ["answer_length", "loss", "cud", "s_n_nodes",
                                          "pilot_5"]
    assert inputs["forecast_pilot_20"][-2:] == ["pilot_5", "pilot_20"]
    assert all("selected" not in v and "random" not in v for v in inputs.values())
    empty = ladder_table({}, {})[0]
    assert empty.empty
