"""One self-contained HTML report (every figure embedded as a base64 PNG, no outside resource)
plus the same figures as PNG files.

Every section is optional: one whose inputs are missing is left out and the report says so.
Sections: the CUD distribution; CUD against each method's actual outcome (with the methods' own
agreement as a reference, METHOD §9); ROC curves of CUD and the baselines; the structure of the
easy and hard anchor circuits (layer-by-layer heat maps, statistics and the paper's claim);
drawings of chosen samples' circuits; the hardest and easiest samples with their text.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from cud.circuits.export import json_file_name
from cud.circuits.graph import Graph
from cud.difficulty.groundtruth import indexed_by_id
from cud.errors import ConfigError
from cud.folders import folder_lock
from cud.progress import Progress
from cud.tables import write_csv
from cud.report import figures as F

@dataclass(frozen=True)
class ReportSettings:
    """The report (`cud report`, ``[report]`` of `cud run`): its title, the outcomes shown
    against CUD (the first also defines "hard" for the ROC curves), how many hardest and
    easiest samples are listed; ``enabled``: whether `cud run` writes it."""

    enabled: bool = True
    title: str = "CUD report"
    outcomes: tuple[str, ...] = ("nll_after", "nll_delta")
    n_extremes: int = 10

    def __post_init__(self):
        if self.n_extremes < 1:
            raise ConfigError(f"n_extremes must be at least 1, got {self.n_extremes}")
        if not self.outcomes:
            raise ConfigError("report.outcomes: give at least one outcome")


@dataclass
class ReportInputs:
    """What a report is made of; every field may be None. Tables are indexed by sample id
    (a column ``id`` is accepted too and becomes the index).

    - ``graph``, ``ids``, ``circuits`` (N, E) bool, ``edge_scores`` (N, E) float: per-sample
      circuits, row k = sample ``ids[k]`` (e.g. from :func:`cud.circuits.store.load_circuits`);
    - ``cud``: column ``cud`` (0 easy .. 1 hard), optionally ``d_E`` and ``d_H``, one row per id;
    - ``anchors``: ``{"easy": [ids], "hard": [ids]}``; ``excluded``: every id whose outcome was
      read to choose the anchors (kept out of every validation number);
    - ``anchor_circuits``: ``{"easy": (E,), "hard": (E,)}`` C_E and C_H;
    - ``outcomes``: ``{method: table}`` with ``cud unlearn``'s columns (``nll_after``,
      ``nll_delta``, ...);
    - ``baselines``: one column per baseline difficulty metric (``cud baselines``);
    - ``samples``: columns ``question`` and ``answer``;
    - ``statistics``: per-circuit structure statistics (computed from the circuits when None);
    - ``strategy``: plain against a strategy, one row per method
      (:func:`cud.unlearning.compare.compare_strategy`'s table).
    """

    graph: Graph | None = None
    ids: list[str] | None = None
    circuits: np.ndarray | None = None
    edge_scores: np.ndarray | None = None
    cud: pd.DataFrame | None = None
    anchors: dict[str, list[str]] | None = None
    excluded: list[str] | None = None
    anchor_circuits: dict[str, np.ndarray] | None = None
    outcomes: dict[str, pd.DataFrame] | None = None
    baselines: pd.DataFrame | None = None
    samples: pd.DataFrame | None = None
    statistics: pd.DataFrame | None = None
    study: object | None = None      # a saved validation (:func:`cud.difficulty.study.read_study`)
    strategy: pd.DataFrame | None = None
    sources: dict[str, str] = field(default_factory=dict)   # input name -> where it came from

    @property
    def has_circuits(self) -> bool:
        return self.graph is not None and self.circuits is not None and self.ids is not None


@dataclass
class Report:
    html: Path
    figures: dict[str, Path]          # figure name -> PNG file
    tables: dict[str, pd.DataFrame]   # table name -> the numbers shown (also tables/<name>.csv)
    sections: list[str]               # sections present, in order
    notes: list[str]                  # sections left out and why, and other caveats


def _indexed(table: pd.DataFrame | None) -> pd.DataFrame | None:
    return None if table is None else indexed_by_id(table)


def _numpy(x) -> np.ndarray | None:
    if x is None:
        return None
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class _Builder:
    """Collects figures (PNG files + embedded copies) and HTML fragments."""

    def __init__(self, out_dir: Path, dpi: int, progress: Progress | None):
        self.out_dir, self.dpi, self.progress = out_dir, dpi, progress
        self.figure_dir = out_dir / "figures"
        self.figure_dir.mkdir(parents=True, exist_ok=True)
        self.figures: dict[str, Path] = {}
        self.table_dir = out_dir / "tables"
        self.tables: dict[str, pd.DataFrame] = {}
        self.parts: list[str] = []
        self.sections: list[str] = []
        self.notes: list[str] = []

    def section(self, key: str, title: str, intro: str = "") -> None:
        self.sections.append(key)
        self.parts.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>')
        if intro:
            self.parts.append(f"<p>{intro}</p>")

    def end(self) -> None:
        self.parts.append("</section>")

    def skip(self, title: str, why: str) -> None:
        self.notes.append(f"{title}: left out ({why})")

    def figure(self, name: str, make: Callable[[], "F.Figure"], caption: str) -> None:
        if self.progress:
            self.progress("report", len(self.figures), None, name)
        fig = make()
        png = F.figure_png(fig, self.dpi)
        path = self.figure_dir / f"{name}.png"
        path.write_bytes(png)
        self.figures[name] = path
        data = base64.b64encode(png).decode("ascii")
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}" '
            f'data-figure="{html.escape(name)}"><figcaption>{caption} '
            f'<span class="file">figures/{html.escape(name)}.png</span></figcaption></figure>')

    def table(self, frame: pd.DataFrame, *, name: str | None = None, index: bool = True,
              digits: int = 3) -> None:
        if name is not None:
            self.tables[name] = frame
            self.table_dir.mkdir(exist_ok=True)
            write_csv(frame, self.table_dir / f"{name}.csv", index=index)
        def fmt(v) -> str:
            if isinstance(v, (float, np.floating)):
                return "–" if not np.isfinite(v) else f"{v:.{digits}g}"
            return "" if v is None else str(v)
        shown = frame.map(fmt)
        shown.index = [fmt(i) for i in frame.index]
        shown.index.name = frame.index.name
        table = shown.to_html(index=index, escape=True, border=0, classes="data")
        for word in ("agrees", "opposite"):
            table = table.replace(f"<td>{word}</td>", f'<td class="{word}">{word}</td>')
        self.parts.append(table)

    def text(self, fragment: str) -> None:
        self.parts.append(fragment)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#212529;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #dee2e6;padding-bottom:.2em;
margin-top:2em}figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #f1f3f5}
figcaption{font-size:.9em;color:#495057}.file{color:#868e96;font-family:monospace;
font-size:.85em;margin-left:.5em}table.data{border-collapse:collapse;font-size:.85em;margin:.6em 0}
table.data th,table.data td{padding:.25em .6em;border-bottom:1px solid #e9ecef;text-align:left;
vertical-align:top;max-width:34em}.notes{background:#fff9db;
padding:.6em 1em;border-left:4px solid #fab005}.muted{color:#868e96}nav a{margin-right:1em}
.agrees{color:#2b8a3e;font-weight:600}.opposite{color:#c92a2a;font-weight:600}
"""


def _forgetting(outcomes: Mapping[str, pd.DataFrame], outcome: str) -> dict[str, pd.Series]:
    from cud.difficulty.groundtruth import forgetting
    out = {}
    for method, table in outcomes.items():
        if outcome in table.columns or outcome == "steps_to_forget":
            out[method] = forgetting(table, outcome, source=method)
    return out


def _direction(outcome: str) -> str:
    from cud.unlearning.outcomes import METRICS
    metric = outcome.rsplit("_", 1)[0]
    if outcome == "steps_to_forget":
        return "lower = forgotten sooner"
    return METRICS[metric].direction if metric in METRICS else ""


def build_report(inputs: ReportInputs, out_dir: str | Path, *, title: str = "CUD report",
                 outcomes: Sequence[str] = ("nll_after", "nll_delta"),
                 draw: Sequence[str] | None = None, n_extremes: int = 10, dpi: int = 110,
                 progress: Progress | None = None) -> Report:
    """Write ``<out_dir>/report.html``, ``<out_dir>/figures/*.png`` and the numbers of its tables
    as ``<out_dir>/tables/*.csv``.

    ``outcomes``: outcome columns shown against CUD (METHOD §9: the raw answer loss after
    unlearning and its change); the first also defines a method's *hard* samples for the ROC
    curves (forgetting below that method's median). ``draw``: sample ids whose circuits are drawn
    (default: the easiest and hardest evaluated sample by CUD). ``n_extremes``: rows of the
    hardest/easiest tables. ``progress`` (task ``report``) is called before each figure. One
    process at a time writes into ``out_dir`` (:func:`~cud.folders.folder_lock`)."""
    out_dir = Path(out_dir)
    with folder_lock(out_dir):
        return _build_report(inputs, out_dir, title, outcomes, draw, n_extremes, dpi, progress)


def _build_report(inputs, out_dir, title, outcomes, draw, n_extremes, dpi, progress) -> Report:
    b = _Builder(out_dir, dpi, progress)
    cud_table = _indexed(inputs.cud)
    if cud_table is not None and "cud" not in cud_table.columns:
        from cud.errors import DataError
        raise DataError("the CUD table has no 'cud' column", file=inputs.sources.get("cud"))
    cud = cud_table["cud"].astype(float) if cud_table is not None else None
    study = inputs.study
    anchors = {k: [str(i) for i in v] for k, v in (inputs.anchors or {}).items()} or None
    if study is not None and anchors is None:
        main = study.anchors["main"]
        anchors = {"easy": list(main.easy), "hard": list(main.hard)}
    anchor_ids = set((anchors or {}).get("easy", [])) | set((anchors or {}).get("hard", []))
    # "held" = every sample not evaluated: the anchors and the rest of their pool
    held = anchor_ids | set(map(str, inputs.excluded or []))
    if study is not None:
        held |= set(study.excluded)
    directions = _directions(study, inputs, anchors)
    outcome_tables = {m: _indexed(t) for m, t in (inputs.outcomes or {}).items()}
    baselines = _indexed(inputs.baselines)
    samples = _indexed(inputs.samples)
    forgetting = {o: _forgetting(outcome_tables, o) for o in outcomes} if outcome_tables else {}
    for o in [o for o, f in forgetting.items() if not f]:
        b.notes.append(f"Outcome '{o}': in no method's outcome table, not shown")
    forgetting = {o: f for o, f in forgetting.items() if f}

    if study is not None and not getattr(study, "ladder", pd.DataFrame()).empty:
        _ladder_section(b, study)
    ladder_parts, b.parts = b.parts, []   # drawn right after the verdict
    _distribution_section(b, cud, anchors)
    _outcomes_section(b, cud, forgetting, outcome_tables, study, anchors, held)
    if study is not None:
        _study_section(b, study)
    else:
        b.skip("Held-out validation", "needs a validation folder (`cud validate`)")
    first = next(iter(forgetting), None)
    _roc_section(b, first, forgetting, cud, baselines, held, directions)

    stats = _indexed(inputs.statistics)
    if stats is None and inputs.has_circuits:
        from cud.circuits.structure import structure_statistics
        stats = structure_statistics(inputs.graph, _numpy(inputs.circuits), ids=inputs.ids)
    if inputs.graph is not None and (inputs.anchor_circuits or (anchors and inputs.has_circuits)):
        _structure_section(b, inputs, anchors, stats, cud, forgetting, first)
    else:
        b.skip("Structure of the anchor circuits", "needs circuits and anchors")
    if inputs.has_circuits:
        _drawings(b, inputs, cud, held, draw)
    else:
        b.skip("Circuit drawings", "no circuits")
    _extremes_section(b, cud_table, samples, anchors, outcome_tables, first, n_extremes)
    if inputs.strategy is not None and not inputs.strategy.empty:
        _strategy_section(b, inputs.strategy)

    page = _page(title, inputs, b, ladder_parts)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return Report(path, b.figures, b.tables, b.sections, b.notes)


def _distribution_section(b: "_Builder", cud: pd.Series | None, anchors) -> None:
    if cud is None:
        b.skip("CUD distribution", "no CUD scores")
        return
    b.section("distribution", "CUD distribution")
    b.figure("cud_distribution", lambda: F.cud_distribution(cud, anchors),
             "CUD of every sample; anchors in their colours. 0 = circuit like the easy anchor "
             "circuit, 1 = like the hard one.")
    summary = cud.describe()[["count", "mean", "std", "min", "25%", "50%", "75%", "max"]]
    b.table(summary.to_frame("cud").T, name="cud_summary")
    b.end()


def _outcomes_section(b: "_Builder", cud, forgetting, outcome_tables, study, anchors,
                      held: set[str]) -> None:
    if cud is None or not forgetting:
        b.skip("CUD against outcomes", "needs CUD scores and unlearning outcomes")
        return
    b.section("outcomes", "CUD against the actual outcome",
              "Each point is a sample; y is its raw outcome after unlearning with that "
              "method. A working CUD puts the samples that are forgotten least on the "
              "right: with a ‘higher = more forgotten’ outcome the cloud falls. The titles "
              "give the study's held-out ρ with the difficulty (higher = harder), "
              "averaged over its anchor pools; the points are the first pool's.")
    panels, titles = {}, {}
    for o in forgetting:
        for method, table in outcome_tables.items():
            if o in table.columns:
                label = f"{method}: {o}"
                panels[label] = table[o].astype(float)
                titles[label] = _study_title(study, "cud", method, o)
    b.figure("cud_vs_outcome",
             lambda: F.cud_vs_outcome(cud, panels, anchors=anchors, excluded=list(held),
                                      titles=titles, ncols=min(4, len(outcome_tables))),
             "CUD against each method's outcome (" + "; ".join(
                 f"{o}: {html.escape(_direction(o))}" for o in forgetting) + ").")
    b.end()


def _roc_section(b: "_Builder", first: str | None, forgetting, cud, baselines, held: set[str],
                 directions) -> None:
    if first is None or (cud is None and baselines is None):
        b.skip("ROC curves", "needs unlearning outcomes and CUD or baseline scores")
        return
    scores = pd.DataFrame(index=pd.Index(sorted(set().union(
        *(f.index for f in forgetting[first].values()))), name="id"))
    if cud is not None:
        scores["cud"] = cud
    if baselines is not None:
        for col in baselines.columns:
            if pd.api.types.is_numeric_dtype(baselines[col]):
                scores[col] = baselines[col].astype(float)
    hard = {}
    for method, f in forgetting[first].items():
        f = f[~f.index.isin(held)]
        hard[method] = f < f.median()
    b.section("roc", "ROC curves: finding the hard samples",
              f"A sample counts as hard for a method when its forgetting "
              f"({html.escape(first)}) is below that method's median over the evaluated "
              f"samples (the anchor pool left out). Every score is read in the direction "
              f"the study read from the anchors (‘-name’: lower = harder).")
    b.figure("roc_curves", lambda: F.roc_curves(scores, hard, directions=directions),
             "ROC curves of CUD (black) and the baselines; AUROC in the legend.")
    table = F.roc_table(scores, hard, directions=directions)
    table["score"] = [("-" if n else "") + s for s, n in zip(table["score"], table["negated"])]
    auc = table.pivot(index="score", columns="method", values="auc")
    order = list(dict.fromkeys(table["score"]))          # CUD first, as in the scores
    b.table(auc.reindex(index=order, columns=list(hard)), name="roc_auc")
    b.end()


def _extremes_section(b: "_Builder", cud_table, samples, anchors, outcome_tables,
                      first: str | None, n_extremes: int) -> None:
    if cud_table is None:
        b.skip("Hardest and easiest samples", "no CUD scores")
        return
    b.section("extremes", "The hardest and easiest samples by CUD",
              "Anchors are marked; outcomes are each method's "
              f"{html.escape(first or 'outcome')} ({html.escape(_direction(first or ''))}).")
    for label, ascending in (("hardest", False), ("easiest", True)):
        b.text(f"<h3>{n_extremes} {label}</h3>")
        b.table(_extremes(cud_table, samples, anchors, outcome_tables, first, n_extremes,
                          ascending), name=label, index=False)
    if samples is None:
        b.notes.append("Sample texts: not shown (no samples given)")
    b.end()


def _directions(study, inputs: ReportInputs, anchors) -> dict[str, int] | None:
    """Each metric's direction: the study's (read from the anchors), or read from the anchors
    here by the same rule (:func:`cud.difficulty.validation.orientation`)."""
    if study is not None and not study.heldout.empty:
        return study.heldout.groupby("metric")["direction"].first().astype(int).to_dict()
    if anchors and inputs.baselines is not None:
        from cud.difficulty.validation import orientation
        frame = _indexed(inputs.baselines).select_dtypes("number")
        return orientation(frame, anchors["easy"], anchors["hard"]).to_dict()
    return None


def _row(study, metric: str, method: str, outcome: str):
    h = study.heldout
    rows = h[(h["metric"] == metric) & (h["method"] == method) & (h["outcome"] == outcome)]
    return rows.iloc[0] if len(rows) else None


def _study_title(study, metric: str, method: str, outcome: str) -> str:
    row = _row(study, metric, method, outcome) if study is not None else None
    if row is None:
        return ""
    return (f"held-out ρ = {row['spearman']:+.2f} [{row['spearman_lo']:+.2f}, "
            f"{row['spearman_hi']:+.2f}], {int(row['pools'])} pools of n = {int(row['n'])}")


def _fmt(v: float) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:+.2f}"


def _beats(diff_lo: float, diff_hi: float) -> str:
    if diff_lo > 0:
        return "<b class='agrees'>beats</b>"
    if diff_hi < 0:
        return "<b class='opposite'>is beaten by</b>"
    return "<b>does not beat</b>"


def collapsed_note(study) -> str:
    """A warning naming each method flagged collapsed (its retain NLL rose past the budget):
    its outcomes describe a damaged model, and every number judged against them says so."""
    flags = getattr(study, "flags", None) or {}
    bad = {m: f for m, f in flags.items() if f.get("collapsed")}
    if not bad:
        return ""
    items = ", ".join(
        f"<b>{html.escape(m)}</b> (retain NLL {_fmt(f.get('retain_nll_rise'))} nats on the "
        f"{html.escape(str(f.get('collapse_measure', '')))}, budget "
        f"{f.get('retain_budget')})" for m, f in bad.items())
    return (f"<p><b class='opposite'>Collapsed</b>: {items}. These methods damaged the model "
            f"beyond the budget: their outcomes describe a broken model rather than the samples, "
            f"and every figure judged against them is marked (collapsed). Calibrate them "
            f"(<code>cud unlearn --calibrate METHOD</code>, <code>[unlearning] calibrate</code>) "
            f"before reading them.</p>")


def ladder_lines(study, outcome: str) -> str:
    """Per method, the best forecast at each price tier (free, one pass, circuits, pilot at
    f %) and whether it beats the best single baseline by the study's paired test."""
    from cud.difficulty.ladder import best_per_tier
    ladder = getattr(study, "ladder", None)
    if ladder is None or ladder.empty:
        return ""
    best = best_per_tier(ladder, outcome)
    items = []
    for method, group in best.groupby("method", sort=False):
        parts, previous = [], None
        for r in group.to_dict("records"):
            if r["estimate"] == previous:
                parts.append(f"{html.escape(r['tier_label'])}: nothing better")
                continue
            previous = r["estimate"]
            price = r["seconds_per_sample"]
            cost = "free" if price == 0 else "price unknown" if not np.isfinite(price) \
                else f"{price:.3g} s/sample"
            text = (f"{html.escape(r['tier_label'])}: <code>{html.escape(r['estimate'])}</code> "
                    f"ρ = {_fmt(r['spearman'])} [{_fmt(r['spearman_lo'])}, "
                    f"{_fmt(r['spearman_hi'])}] ({cost})")
            if r["estimate"] == r["versus"]:
                text += " (the best single baseline)"
            elif np.isfinite(r["diff"]):
                text += (f", {_beats(r['diff_lo'], r['diff_hi'])} "
                         f"{html.escape(r['versus'])} by {_fmt(r['diff'])} "
                         f"[{_fmt(r['diff_lo'])}, {_fmt(r['diff_hi'])}], p = {r['p']:.3g}")
            parts.append(text)
        flag = " <b class='opposite'>(collapsed)</b>" if group["collapsed"].any() else ""
        items.append(f"<li><b>{html.escape(method)}</b>{flag}: " + "; ".join(parts) + "</li>")
    return (f"<p>The best forecast at each price (what that price buys: the estimates of that "
            f"tier or a cheaper one; <code>validation/ladder.csv</code> has every estimate), "
            f"held-out ρ with {html.escape(outcome)}, against each method's best single "
            f"baseline by the paired bootstrap:</p><ul>{''.join(items)}</ul>")


def verdict(study) -> str:
    """The report's opening lines: CUD against the best baseline with the interval and the
    paired test, per method (first outcome), the best forecast at each price (the ladder),
    collapsed methods, and CUD's test-retest reliability."""
    if study is None or (study.paired.empty and getattr(study, "ladder", pd.DataFrame()).empty):
        return ""
    outcome = study.settings.outcomes[0]
    lines = []
    for r in study.paired[(study.paired["metric"] == "cud")
                          & (study.paired["outcome"] == outcome)].itertuples() \
            if not study.paired.empty else ():
        cud, base = _row(study, "cud", r.method, outcome), _row(study, r.versus, r.method,
                                                                 outcome)
        word = _beats(r.diff_lo, r.diff_hi)
        flag = " <b class='opposite'>(collapsed)</b>" if \
            (getattr(study, "flags", None) or {}).get(r.method, {}).get("collapsed") else ""
        lines.append(
            f"<li><b>{html.escape(r.method)}</b>{flag}: CUD ρ = {_fmt(cud['spearman'])} "
            f"[{_fmt(cud['spearman_lo'])}, {_fmt(cud['spearman_hi'])}]; the best baseline, "
            f"{html.escape(r.versus)}, ρ = {_fmt(base['spearman'])} [{_fmt(base['spearman_lo'])}"
            f", {_fmt(base['spearman_hi'])}]. CUD {word} it: difference {_fmt(r.diff)} "
            f"[{_fmt(r.diff_lo)}, {_fmt(r.diff_hi)}], paired bootstrap p = {r.p:.3g}, ahead in "
            f"{r.pools_won:.0%} of {int(r.pools)} anchor pools.</li>")
    retest = ""
    if not study.retest.empty:
        t = study.retest.set_index("quantity")
        if "cud test-retest spearman" in t.index:
            x = t.loc["cud test-retest spearman"]
            retest = (f"<p>Measured again with independent corrupted prompts, CUD agrees with "
                      f"itself at ρ = {_fmt(x['value'])} [{_fmt(x['lo'])}, {_fmt(x['hi'])}] "
                      f"(test-retest, n = {int(x['n'])}): the ceiling of any correlation "
                      f"it can reach.</p>")
    n = int(study.heldout["n"].max()) if not study.heldout.empty else 0
    retest = anchors_note(study, outcome) + retest
    return (f"<section id='verdict'><h2>Verdict on this run</h2>{collapsed_note(study)}"
            f"<p>Held-out Spearman ρ with "
            f"each method's difficulty ({html.escape(outcome)}), mean over "
            f"{len(study.pools) or 1} random anchor pools of n = {n} evaluated samples each, "
            f"with pooled 95% intervals. <i>Signs, everywhere in this report: every metric reads "
            f"higher = predicted harder, every difficulty higher = less forgotten, so a "
            f"working metric has ρ &gt; 0.</i></p><ul>{''.join(lines)}</ul>"
            f"{ladder_lines(study, outcome)}{retest}</section>")


def anchors_note(study, outcome: str) -> str:
    """How many anchors the verdict rests on. A vote of several methods keeps only the samples
    they agree on; when that is under half the anchors asked for, say so and give CUD with each
    method's own anchors (the cross-method matrix's diagonal) beside it."""
    sizes = [(len(p["anchors"]["main"]["easy"]), len(p["anchors"]["main"]["hard"]))
             for p in study.pools if "main" in p.get("anchors", {})]
    if not sizes:
        return ""
    easy, hard = (int(np.median([x[i] for x in sizes])) for i in (0, 1))
    k = study.settings.k
    methods = list(dict.fromkeys(study.heldout["method"])) if not study.heldout.empty else []
    name = str(study.pools[0]["anchors"]["main"].get("name", ""))
    voted = len(methods) > 1 and name.startswith(f"{study.settings.vote}:")
    vote = (f", kept where the {study.settings.vote} vote of the {len(methods)} methods agrees"
            if voted else "")
    text = (f"<p>Anchors: {easy} easy and {hard} hard a pool (median over {len(sizes)} pools; "
            f"{k} a side asked{vote}); CUD's anchor circuits and every baseline's direction "
            f"are read from them.")
    if voted and min(easy, hard) < k / 2:
        c = study.cross_method
        own = [] if c.empty else [
            f"{html.escape(m)} {_fmt(float(r['spearman'].iloc[0]))}" for m in methods
            if len(r := c[(c["anchors_from"] == m) & (c["method"] == m)
                          & (c["outcome"] == outcome)])]
        text += (" <b class='opposite'>Few anchors</b>: the methods disagree about which samples "
                 "are hard, so these numbers rest on few samples and the baselines' directions "
                 "may flip from pool to pool.")
        if own:
            text += (" With each method's own anchors, CUD's held-out ρ is "
                     + ", ".join(own) + " (one study per method: <code>cud validate "
                     "--method M</code>).")
    return text + "</p>"


def _strategy_section(b: _Builder, table: pd.DataFrame) -> None:
    """Plain against the strategy run after it: the comparison table as the stage wrote it."""
    name = html.escape(str(table["strategy"].iloc[0])) if "strategy" in table.columns else ""
    b.section("strategy", f"Plain against the {name} strategy",
              "Per method, the same forget set unlearned plain and with the strategy: share "
              "forgotten overall and in the predicted-hard quartile, mean retain NLL rise, "
              "McNemar's exact p on forgotten or not (overall and in the hard quartile) and "
              "Wilcoxon's p on the per-sample NLL increase, both paired against plain.")
    if {"retain_rise_plain", "forgotten_hard_plain"} <= set(table.columns):
        b.figure("strategy_tradeoff", lambda: F.strategy_tradeoff(table),
                 "The forget-retain trade-off per method: share forgotten (circles: every "
                 "sample; triangles: the predicted-hard quartile) against the mean retain NLL "
                 "rise, plain (grey) and with the strategy (arrow's head).")
    b.table(table, name="strategy_comparison", index=False)
    b.end()


def _ladder_section(b: _Builder, study) -> None:
    """The forecast ladder: every estimate of each method at its price (figure and table)."""
    outcome = study.settings.outcomes[0]
    b.section("ladder", "The forecast ladder: each estimate at its price",
              "Each point is one difficulty estimate for one method: x its seconds per sample, "
              "measured where it was made (free estimates at the left edge), y its held-out ρ "
              "(mean over anchor pools, pooled 95% interval). Baselines grey, CUD and its "
              "variants blue, the method's own pilot at a fraction of its steps orange, learned "
              "forecasters (F:, fitted on each pool's samples only) green; the dotted line is "
              "the best single baseline.")
    b.figure("forecast_ladder", lambda: F.forecast_ladder(study.ladder, outcome=outcome),
             f"The forecast ladder ({html.escape(outcome)}).")
    rows = study.ladder[study.ladder["outcome"] == outcome]
    shown = rows[["method", "estimate", "tier", "seconds_per_sample", "share_of_method", "steps",
                  "spearman", "spearman_lo", "spearman_hi", "versus", "diff", "p",
                  "collapsed"]].sort_values(["method", "spearman"], ascending=[True, False])
    b.table(shown, name=f"ladder_{outcome}", index=False)
    b.end()


def _study_section(b: _Builder, study) -> None:
    """The study's tables: held-out statistics over pools, the paired tests, test-retest, the
    variant chosen on each pool's validation part, the confound check."""
    b.section("heldout", "Held-out validation over anchor pools",
              "Every number is on evaluated samples only (never an anchor pool's); mean over "
              "the pools, [pooled 95% interval]; ‘random’ is the permutation null; sign as "
              "stated in the verdict.")
    h = study.heldout
    for outcome in study.settings.outcomes:
        rows = h[h["outcome"] == outcome]
        if rows.empty:
            continue
        shown = rows.assign(cell=[f"{_fmt(r.spearman)} [{_fmt(r.spearman_lo)}, "
                                  f"{_fmt(r.spearman_hi)}]" for r in rows.itertuples()])
        table = shown.pivot(index="metric", columns="method", values="cell")
        order = [m for m in ("cud", "selected", "predictor", "combined") if m in table.index]
        order += sorted(m for m in table.index if m not in order and m != "random")
        order += ["random"] if "random" in table.index else []
        b.text(f"<h3>Spearman ρ, {html.escape(outcome)}</h3>")
        b.table(table.reindex(order), name=f"heldout_spearman_{outcome}")
        auc = rows.pivot(index="metric", columns="method", values="auroc").reindex(order)
        b.text(f"<h3>AUROC (hardest vs easiest quartile), {html.escape(outcome)}</h3>")
        b.table(auc, name=f"heldout_auroc_{outcome}")
    if not study.paired.empty:
        b.text("<h3>Paired tests against the best baseline</h3>")
        b.table(study.paired, name="paired", index=False)
    if not study.retest.empty:
        b.text("<h3>Test-retest</h3>")
        b.table(study.retest, name="retest", index=False)
    if not study.variants.empty:
        v = study.variants.groupby("variant").agg(
            chosen=("selected", "sum"), validation_spearman=("validation_spearman", "mean"))
        b.text("<h3>Variants: how often each was chosen on a pool's validation part</h3>")
        b.table(v.sort_values("validation_spearman", ascending=False), name="variants")
    if not study.confounds.empty:
        b.text("<h3>Confounds: question type and answer length</h3>")
        b.table(study.confounds, name="confounds", index=False)
    b.end()


def _structure_section(b: _Builder, inputs: ReportInputs, anchors, stats, cud, forgetting,
                       first) -> None:
    from cud.analysis.signature import analyze_structure
    from cud.circuits.structure import STATISTICS
    b.section("structure", "Structure of the easy and hard circuits",
              "The paper's claim: easy samples' circuits are short, shallow and early-to-middle; "
              "hard samples' use longer edges and deeper pathways near the last layers. The "
              "verdicts below test it on this model; the answer may be no.")
    graph = inputs.graph
    maps: dict[str, np.ndarray] = {}
    caption = ""
    if inputs.anchor_circuits:
        maps = {f"{k} anchor circuit": _numpy(v) for k, v in inputs.anchor_circuits.items()}
        caption = "The anchor circuits C_E and C_H"
    elif anchors and inputs.has_circuits:
        where = {i: k for k, i in enumerate(inputs.ids)}
        circuits = _numpy(inputs.circuits)
        for group in ("easy", "hard"):
            rows = [where[i] for i in anchors.get(group, []) if i in where]
            if rows:
                maps[f"{group} anchors (mean of {len(rows)})"] = circuits[rows].astype(float)
        caption = "The easy and hard anchors' own circuits, averaged"
    if maps:
        b.figure("anchor_heatmaps", lambda: F.layer_heatmaps(graph, maps),
                 f"{caption}: edges from each writer layer (x) into each reader layer (y). "
                 "Distance below the diagonal = edge span; rows high up = late.")
    if stats is not None and anchors:
        diffs = {f"{m} {first}": -f for m, f in forgetting.get(first, {}).items()} if first \
            else {}
        analysis = analyze_structure(stats, anchors=anchors, cud=cud, difficulties=diffs)
        claimed = [s for s, (_, sign) in STATISTICS.items() if sign and s in stats.columns]
        if analysis.anchors is not None and not analysis.anchors.empty:
            effects = analysis.anchors["cliffs_delta"].to_dict()
            b.figure("anchor_structure",
                     lambda: F.structure_boxplots(stats, {"easy": anchors.get("easy", []),
                                                          "hard": anchors.get("hard", [])},
                                                  columns=claimed, effects=effects),
                     "Structure statistics of the easy and hard anchors' circuits "
                     "(δ = Cliff's delta, positive = higher in hard).")
        for name, table, text in (
                ("anchors", analysis.anchors, "Easy vs hard anchors (Mann-Whitney U, Holm)"),
                ("cud", analysis.cud, "CUD-easy vs CUD-hard thirds (anchors left out)")):
            if table is not None and not table.empty:
                b.text(f"<h3>{text}</h3>")
                shown = table[["n_easy", "n_hard", "median_easy", "median_hard",
                               "cliffs_delta", "p_holm", "expected", "verdict"]]
                b.table(shown, name=f"compare_{name}")
        if analysis.correlations is not None:
            b.text("<h3>Spearman ρ of each statistic with CUD and with each method's "
                   "difficulty (higher = harder)</h3>")
            b.table(analysis.correlations.pivot(index="statistic", columns="target",
                                                values="rho").reindex(stats.columns),
                    name="correlations")
        summary = analysis.summary()
        if summary:
            items = "".join(f"<li><b>{html.escape(k)}</b>: " + ", ".join(
                f"{n} {html.escape(v)}" for v, n in counts.items()) + "</li>"
                for k, counts in summary.items())
            b.text(f"<p>Verdicts over the statistics with a claim:</p><ul>{items}</ul>")
    b.text("<p class='muted'>Definitions: edge span = reader layer - writer layer (input = -1, "
           "logits = L); path length = edges on an input-to-logits path; last third = the last "
           "max(1, round(L/3)) layers (and logits, for edges). See "
           "<code>cud.circuits.structure</code>.</p>")
    b.end()


def _drawings(b: _Builder, inputs: ReportInputs, cud, held, draw) -> None:
    ids = [str(i) for i in inputs.ids]
    where = {i: k for k, i in enumerate(ids)}
    if draw is None:
        draw = []
        if cud is not None:
            scored = cud[cud.index.isin(where) & ~cud.index.isin(held)].dropna()
            if len(scored):
                draw = [scored.idxmin(), scored.idxmax()]
        draw = list(dict.fromkeys(draw)) or ids[:1]
    draw = list(dict.fromkeys(draw))
    unknown = [i for i in draw if i not in where]
    if unknown:
        from cud.errors import DataError
        raise DataError(f"no circuit for sample id(s) {', '.join(unknown[:5])} to draw")
    b.section("circuits", "Circuits of single samples",
              "Layers as rows (input at the bottom, logits on top); heads then the MLP along each "
              "row, the MLP drawn a little higher (it reads its layer's heads unless the model "
              "runs them in parallel). Line colour = how the edge is read; width = |edge "
              "score|.")
    circuits, scores = _numpy(inputs.circuits), _numpy(inputs.edge_scores)
    for sample_id in draw:
        k = where[sample_id]
        label = sample_id + (f" (CUD {cud[sample_id]:.3f})" if cud is not None and
                             sample_id in cud.index else "")
        b.figure(f"circuit_{_file_name(sample_id)}",
                 lambda k=k, label=label: F.circuit_drawing(
                     inputs.graph, circuits[k], None if scores is None else scores[k],
                     title=label),
                 f"Circuit of sample {html.escape(label)}.")
    b.end()


def _file_name(sample_id: str) -> str:
    """The sample's name in file names: the circuit JSON export's, which no other id shares
    (``a/b`` -> ``a%2Fb``, ``a_b`` stays ``a_b``, ``a b`` -> ``a%20b``)."""
    return json_file_name(sample_id).removesuffix(".json")


def _extremes(cud_table, samples, anchors, outcomes, outcome, n, ascending) -> pd.DataFrame:
    order = cud_table["cud"].astype(float).dropna().sort_values(ascending=ascending,
                                                                kind="stable")
    picked = order.index[:n]
    table = pd.DataFrame({"id": picked, "CUD": order.loc[picked].to_numpy()})
    for col in ("d_E", "d_H", "d_easy", "d_hard"):
        if col in cud_table.columns:
            table[col] = cud_table.loc[picked, col].to_numpy(dtype=float)
    if anchors:
        table["anchor"] = ["easy" if i in set(anchors.get("easy", [])) else
                           "hard" if i in set(anchors.get("hard", [])) else ""
                           for i in picked]
    if outcome:
        for method, t in outcomes.items():
            if outcome in t.columns:
                table[f"{method}"] = t[outcome].reindex(picked).to_numpy(dtype=float)
    if samples is not None:
        for col in ("question", "answer"):
            if col in samples.columns:
                table[col] = samples[col].reindex(picked).fillna("").to_numpy()
    return table


def _page(title: str, inputs: ReportInputs, b: _Builder, first: Sequence[str] = ()) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = {"ladder": "ladder", "distribution": "CUD", "outcomes": "outcomes",
             "heldout": "held-out",
             "roc": "ROC", "structure": "structure", "circuits": "circuits",
             "extremes": "samples"}
    nav = "".join(f'<a href="#{k}">{names.get(k, k)}</a>' for k in b.sections)
    sources = "".join(f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>"
                      for k, v in inputs.sources.items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in b.notes)
    body = "\n".join(b.parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='muted'>Circuit-guided Unlearning Difficulty"
            f" · generated {stamp}</p><nav>{nav}</nav>" + verdict(inputs.study)
            + "\n".join(first)
            + (f"<h3>Inputs</h3><ul>{sources}</ul>" if sources else "")
            + (f"<div class='notes'><b>Not in this report</b><ul>{notes}</ul></div>"
               if notes else "")
            + f"{body}</body></html>\n")
