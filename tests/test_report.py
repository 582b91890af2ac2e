"""The report: figures, one self-contained HTML file checked in headless Chromium, and the
`analyze` and `report` commands on folders written the way the other commands write them."""

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from typer.testing import CliRunner

from cud.report import (ReportInputs, build_report, circuit_drawing, layer_heatmaps,
                        load_report_inputs, roc_table)

METHODS = ("graddiff", "npo")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Real circuits of a tiny model, anchor circuits, a CUD, and outcomes that follow the CUD
    (less forgetting where CUD is high) with noise, so the report's signs can be checked."""
    from cud.circuits.attribution import AttributionSettings, attribute
    from cud.circuits.ablation import CorruptAblation
    from cud.circuits.runner import ResidualRunner
    from cud.circuits.selection import SelectionSettings, select
    from cud.data import batches, encode_samples, fictitious_authors
    from cud.models import tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model runs fastest on one thread
    lm = tiny_model("llama", num_hidden_layers=3)
    samples = fictitious_authors(20)
    samples[3] = dataclasses.replace(
        samples[3], question="Is <b>bold</b> & <script>alert(1)</script> escaped?")
    runner = ResidualRunner(lm.adapter)
    graph = runner.graph
    ids, scores = [], []
    for batch in batches(encode_samples(lm.tokenizer, samples), 10, lm.pad_token_id):
        a = attribute(runner, batch, CorruptAblation(lm.tokenizer), AttributionSettings(steps=2))
        ids += a.ids
        scores.append(a.edge_scores)
    torch.set_num_threads(threads)
    scores = torch.cat(scores)
    selection = SelectionSettings(n_edges=20)
    circuits = select(graph, scores, selection)
    easy, hard = ids[:3], ids[3:6]
    where = {i: k for k, i in enumerate(ids)}
    mean = torch.stack([scores[[where[i] for i in easy]].mean(0),
                        scores[[where[i] for i in hard]].mean(0)])
    anchor_circuits = select(graph, mean, selection)

    def jaccard(c, anchor):
        return 1 - (c & anchor).sum(-1).double() / (c | anchor).sum(-1).double()

    d_e, d_h = jaccard(circuits, anchor_circuits[0]), jaccard(circuits, anchor_circuits[1])
    cud = (d_e / (d_e + d_h)).numpy()
    cud_table = pd.DataFrame({"id": ids, "cud": cud, "d_E": d_e.numpy(), "d_H": d_h.numpy()})
    rng = np.random.default_rng(0)
    index = pd.Index(ids, name="id")
    outcomes = {}
    scaled = (cud - cud.min()) / np.ptp(cud)
    for k, method in enumerate(METHODS):
        before = rng.uniform(0.2, 0.6, len(ids))
        delta = 4 - 3 * scaled + rng.normal(0, 0.05 * (k + 1), len(ids))
        outcomes[method] = pd.DataFrame({"nll_before": before, "nll_after": before + delta,
                                         "nll_delta": delta}, index=index)
    baselines = pd.DataFrame({"loss": -scaled + rng.normal(0, 0.1, len(ids)),
                              "random": rng.uniform(size=len(ids))}, index=index)
    texts = pd.DataFrame({"id": [s.id for s in samples],
                          "question": [s.question for s in samples],
                          "answer": [s.answer for s in samples]})
    from cud.difficulty.anchors import anchors_from_ids
    from cud.difficulty.study import StudySettings, run_study
    study = run_study(ids, scores, graph, selection, outcomes, baselines=baselines,
                      anchors=anchors_from_ids(easy, hard), circuits=circuits,
                      settings=StudySettings(sizes=(20,), distances=("cosine",), n_boot=200,
                                             n_perm=200, variant_sizes=(20, 40), node_k=8,
                                             predictor=False, cross_method=False))
    inputs = ReportInputs(graph=graph, ids=ids, circuits=circuits.numpy(),
                          edge_scores=scores.numpy(), cud=cud_table,
                          anchors={"easy": easy, "hard": hard},
                          anchor_circuits={"easy": anchor_circuits[0].numpy(),
                                           "hard": anchor_circuits[1].numpy()},
                          outcomes=outcomes, baselines=baselines, samples=texts, study=study)
    out = tmp_path_factory.mktemp("report")
    # 10 hardest + 10 easiest of 20: every sample text is in the report
    report = build_report(inputs, out, draw=[ids[0], ids[-1]], n_extremes=10)
    return {"inputs": inputs, "report": report, "out": out, "samples": samples,
            "scores": scores, "circuits": circuits, "selection": selection, "lm": lm}


FULL = ["ladder", "distribution", "outcomes", "heldout", "roc", "structure", "circuits",
        "extremes"]


def embedded_images(page: str) -> list[tuple[str, bytes]]:
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', page)
    return [(alt, base64.b64decode(data)) for data, alt in found]


def test_full_report_has_every_section_and_figure(run):
    report = run["report"]
    assert report.sections == FULL and report.notes == []
    assert report.html.name == "report.html"
    expected = {"cud_distribution", "cud_vs_outcome", "roc_curves", "anchor_heatmaps",
                "anchor_structure"}
    assert expected <= set(report.figures)
    assert sum(name.startswith("circuit_") for name in report.figures) == 2
    page = report.html.read_text(encoding="utf-8")
    images = embedded_images(page)
    assert len(images) == len(report.figures) == page.count("<img ")
    for alt, png in images:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert report.figures[alt].read_bytes() == png       # the PNG file is the same figure


def test_report_is_self_contained_and_escapes_text(run):
    page = run["report"].html.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=\"(?!data:|#)", page)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_numbers_follow_the_inputs(run):
    report = run["report"]
    study = run["inputs"].study
    # outcomes were made to fall with CUD: the study's held-out rho with the difficulty is
    # strongly positive for both outcome definitions, and the report shows the study's numbers
    table = report.tables["heldout_spearman_nll_delta"]
    assert list(table.columns) == list(METHODS) and table.index[0] == "cud"
    for method in METHODS:
        row = study.heldout[(study.heldout["metric"] == "cud") & (study.heldout["method"] ==
                                                                  method)
                            & (study.heldout["outcome"] == "nll_delta")].iloc[0]
        assert row["spearman"] > 0.5 and row["n"] == 20 - 6
        assert table.loc["cud", method].startswith(f"{row['spearman']:+.2f}")
    page = report.html.read_text(encoding="utf-8")
    verdict = page[page.index("Verdict on this run"):page.index("Inputs") if "Inputs" in page
                   else None]
    assert "higher = predicted harder" in verdict and "best baseline" in verdict
    assert page.index("Verdict on this run") < page.index('<section id="distribution">')
    # CUD finds the hard samples far better than chance; 'loss' (made to fall with CUD) is read
    # negated, the direction the study read from the anchors, and the table says so
    auc = report.tables["roc_auc"]
    assert (auc.loc["cud"] > 0.8).all()
    assert "-loss" in auc.index and "loss" not in auc.index
    assert (report.html.parent / "tables" / "roc_auc.csv").is_file()
    hardest = report.tables["hardest"]
    assert hardest["CUD"].is_monotonic_decreasing and len(hardest) == 10
    assert (hardest["question"] != "").all()


def test_roc_table_reads_each_score_in_its_given_direction():
    ids = [f"s{i}" for i in range(10)]
    hard = pd.Series([False] * 5 + [True] * 5, index=ids)
    scores = pd.DataFrame({"cud": np.arange(10.0)[::-1], "loss": np.arange(10.0)[::-1]},
                          index=ids)
    table = roc_table(scores, {"m": hard}, directions={"loss": -1}).set_index("score")
    assert table.loc["cud", "auc"] == 0 and not table.loc["cud", "negated"]  # no second rule
    assert table.loc["loss", "auc"] == 1 and table.loc["loss", "negated"]


def test_missing_inputs_leave_sections_out_with_a_note(run, tmp_path):
    only_cud = ReportInputs(cud=run["inputs"].cud)
    report = build_report(only_cud, tmp_path)
    assert report.sections == ["distribution", "extremes"]
    assert len(report.notes) == 6
    page = report.html.read_text(encoding="utf-8")
    assert "Not in this report" in page and "no circuits" in page
    assert len(embedded_images(page)) == len(report.figures) == 1


def test_figures_are_figures(run):
    inputs = run["inputs"]
    graph = inputs.graph
    fig = layer_heatmaps(graph, inputs.anchor_circuits)
    assert isinstance(fig, Figure)
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 3
    drawing = circuit_drawing(graph, inputs.circuits[0], inputs.edge_scores[0], title="x")
    assert f"({int(inputs.circuits[0].sum())} edges" in drawing.axes[0].get_title()
    with pytest.raises(ValueError):
        circuit_drawing(graph, np.zeros(graph.n_edges + 1, dtype=bool))


# --- headless Chromium ---------------------------------------------------------------------------

CHECK = """<script>window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement('pre'); out.id = 'img-check';
  out.textContent = 'IMG-CHECK ' + (imgs.length - bad.length) + '/' + imgs.length + ' BAD['
    + bad.map(function (i) { return i.alt; }).join(',') + ']';
  document.body.appendChild(out);
});</script>"""


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True,
                       capture_output=True, timeout=1200)
        path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is needed to check the report in CI (.ci/run installs it)")
        pytest.skip("chromium is not installed and cannot be installed here (needs root and "
                    "apt-get: apt-get install chromium)")
    return path


def load_in_chromium(chromium, html_path, tmp_path):
    """Open a copy of the page (with the check script added) headless; -> (loaded, total, bad)."""
    page = html_path.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>")
    probe = tmp_path / f"probe-{html_path.stem}.html"
    probe.write_text(page, encoding="utf-8")
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--virtual-time-budget=15000",
                             "--dump-dom", probe.as_uri()],
                            capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="img-check">IMG-CHECK (\d+)/(\d+) BAD\[([^\]]*)\]</pre>',
                      result.stdout)
    assert found, f"chromium gave no check result (rc {result.returncode}): " \
                  f"{result.stderr[-2000:]}"
    return int(found[1]), int(found[2]), [b for b in found[3].split(",") if b]


def test_every_figure_loads_in_headless_chromium(run, chromium, tmp_path):
    report = run["report"]
    loaded, total, bad = load_in_chromium(chromium, report.html, tmp_path)
    assert bad == [] and loaded == total == len(report.figures)


def test_the_chromium_check_sees_a_broken_figure(run, chromium, tmp_path):
    page = run["report"].html.read_text(encoding="utf-8")
    broken = page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAiVBOR", 1)
    assert broken != page
    path = tmp_path / "broken.html"
    path.write_text(broken, encoding="utf-8")
    loaded, total, bad = load_in_chromium(chromium, path, tmp_path)
    assert total == len(run["report"].figures) and loaded == total - 1 and len(bad) == 1


# --- the commands, on folders as the other commands write them -------------------------------

@pytest.fixture(scope="module")
def folders(run, tmp_path_factory):
    from cud.difficulty.anchors import anchors_from_ids, anchor_circuits
    from cud.difficulty.score import score_samples
    from cud.circuits.store import CircuitStore, text_hash
    from cud.tables import save_table
    from cud.unlearning.outcomes import save_outcomes

    root = tmp_path_factory.mktemp("folders")
    inputs = run["inputs"]
    store = CircuitStore.open(root / "circuits", {"test": 1}, inputs.graph)
    store.write_batch(inputs.ids, run["scores"], run["circuits"],
                      [{"text_hash": text_hash(s)} for s in run["samples"]])
    store.finalize(inputs.ids)
    anchor_set = anchors_from_ids(inputs.anchors["easy"], inputs.anchors["hard"])
    ac = anchor_circuits(anchor_set, inputs.ids, run["scores"], inputs.graph, run["selection"])
    ac.save(root / "anchors")
    scores = pd.concat([score_samples(inputs.ids, run["scores"], ac, distance_name=d)
                        for d in ("cosine", "jaccard")])
    (root / "scores").mkdir()
    scores.to_parquet(root / "scores" / "scores.parquet", index=False)
    for method, table in inputs.outcomes.items():
        save_outcomes(table, root / "unlearn" / method / "outcomes")
    save_table(inputs.baselines, root / "baselines" / "baselines")
    inputs.study.save(root / "validation")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": s.id, "question": s.question, "answer": s.answer})
                            + "\n" for s in run["samples"]))
    return root


def invoke(*args):
    from cud.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def test_load_report_inputs(folders):
    inputs = load_report_inputs(circuits=folders / "circuits", cud=folders / "scores",
                                distance="jaccard", anchors=folders / "anchors",
                                unlearn=folders / "unlearn", baselines=folders / "baselines",
                                data=str(folders / "data.jsonl"))
    assert inputs.has_circuits and set(inputs.anchor_circuits) == {"easy", "hard"}
    assert not inputs.cud.index.duplicated().any() and (inputs.cud["distance"] == "jaccard").all()
    assert set(inputs.outcomes) == set(METHODS)
    assert list(inputs.baselines.columns) == ["loss", "random"]
    assert inputs.samples.loc[inputs.ids[0], "answer"]
    # anchors from the scores' anchor_role column when no anchors are given
    fallback = load_report_inputs(cud=folders / "scores")
    assert sorted(fallback.anchors["easy"]) == sorted(inputs.anchors["easy"])


def test_analyze_command(folders, tmp_path):
    out = tmp_path / "analysis"
    result = invoke("analyze", "--circuits", folders / "circuits", "--scores", folders / "scores",
                    "--anchors", folders / "anchors", "--outcomes", folders / "unlearn",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert "edge_span_mean ↑" in result.output and "anchors" in result.output
    stats = pd.read_parquet(out / "structure.parquet")
    assert len(stats) == 20 and "path_longest" in stats.columns
    rho = pd.read_csv(out / "correlations.csv")
    assert set(rho["target"]) == {"cud"} | {f"{m} {o}" for m in METHODS
                                            for o in ("nll_after", "nll_delta")}
    assert (out / "compare_anchors.csv").is_file() and (out / "compare_cud.csv").is_file()


def test_report_command(folders, tmp_path):
    out = tmp_path / "rep"
    result = invoke("report", "--circuits", folders / "circuits", "--scores", folders / "scores",
                    "--anchors", folders / "anchors", "--outcomes", folders / "unlearn",
                    "--baselines", folders / "baselines", "--data", folders / "data.jsonl",
                    "--validation", folders / "validation", "--top", 3, "--out", out)
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(embedded_images(page)) == len(pngs) >= 7
    for section in FULL:
        assert f'<section id="{section}">' in page


def test_commands_fail_on_one_line(folders, tmp_path):
    result = invoke("analyze", "--circuits", tmp_path / "nope")
    assert result.exit_code == 2
    assert "error:" in result.output and "no such circuits folder" in result.output
    result = invoke("report", "--scores", folders / "scores", "--distance", "manhattan",
                    "--out", tmp_path / "r")
    assert result.exit_code == 2 and "manhattan" in result.output
    result = invoke("report", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "nothing to report" in result.output


def test_verdict_says_when_a_vote_of_methods_leaves_few_anchors():
    """A majority vote of methods that disagree keeps few anchors: the verdict says how many,
    and gives CUD with each method's own anchors beside it; a single method's study does not
    warn."""
    from types import SimpleNamespace

    from cud.difficulty.study import StudySettings
    from cud.report.html import anchors_note

    def pool(easy, hard, name):
        return {"anchors": {"main": {"easy": [f"e{i}" for i in range(easy)],
                                     "hard": [f"h{i}" for i in range(hard)], "name": name}}}

    settings = StudySettings(k=20, vote="majority")
    heldout = pd.DataFrame({"method": ["ga", "npo"]})
    cross = pd.DataFrame({"anchors_from": ["ga", "ga", "npo", "npo"],
                          "method": ["ga", "npo", "ga", "npo"],
                          "outcome": ["nll_after"] * 4, "spearman": [0.31, -0.1, 0.05, 0.22]})
    voted = SimpleNamespace(pools=[pool(4, 6, "majority:ga+npo"), pool(6, 8, "majority:ga+npo"),
                                   pool(5, 7, "majority:ga+npo")],
                            settings=settings, heldout=heldout, cross_method=cross)
    note = anchors_note(voted, "nll_after")
    assert "5 easy and 7 hard a pool (median over 3 pools; 20 a side asked" in note
    assert "majority vote of the 2 methods" in note and "Few anchors" in note
    assert "ga +0.31, npo +0.22" in note                    # the diagonal, not the off-diagonal

    enough = SimpleNamespace(**{**vars(voted), "pools": [pool(15, 18, "majority:ga+npo")]})
    assert "Few anchors" not in anchors_note(enough, "nll_after")
    single = SimpleNamespace(pools=[pool(3, 3, "ga")], settings=settings,
                             heldout=pd.DataFrame({"method": ["ga"]}), cross_method=cross)
    note = anchors_note(single, "nll_after")
    assert "3 easy and 3 hard" in note and "vote" not in note and "Few anchors" not in note
    assert anchors_note(SimpleNamespace(**{**vars(voted), "pools": []}), "nll_after") == ""
