"""Commands of the analysis stage: `analyze` (structure of the circuits against difficulty) and
`report` (one self-contained HTML file plus PNG figures)."""

from __future__ import annotations

from typing import Optional

import typer

from cud.cli.app import app, console, fail
from cud.errors import CudError


def _csv_list(spec: Optional[str]) -> Optional[list[str]]:
    if spec is None:
        return None
    return [x.strip() for x in spec.split(",") if x.strip()]


@app.command()
def analyze(
    circuits: str = typer.Option(..., help="Circuits folder (`cud circuits --out`)."),
    scores: Optional[str] = typer.Option(None, help="CUD scores (`cud score --out` folder or "
                                                    "its scores table)."),
    distance: Optional[str] = typer.Option(None, help="Which distance's CUD when --scores has "
                                                      "several (default: cosine)."),
    anchors: Optional[str] = typer.Option(None, help="Anchors folder (`cud anchors --out`) or "
                                                     "a JSON file {\"easy\": [...], \"hard\": "
                                                     "[...]} (default: the anchor_role column "
                                                     "of --scores)."),
    outcomes: Optional[str] = typer.Option(None, help="`cud unlearn` output folder "
                                                      "(per-method outcomes)."),
    method: Optional[str] = typer.Option(None, help="Methods of --outcomes (comma list) "
                                                    "(default: all)."),
    outcome: str = typer.Option("nll_after,nll_delta", help="Outcomes to correlate with "
                                                            "(comma list)."),
    fraction: float = typer.Option(1 / 3, show_default="1/3",
                                   help="Share of samples in each of the CUD-easy and "
                                        "CUD-hard groups."),
    alpha: float = typer.Option(0.05, help="Significance level (Holm-adjusted p-values)."),
    out: str = typer.Option("cud-analysis", help="Output folder."),
):
    """Circuit structure, and whether easy and hard samples differ as the paper says.

    Per circuit: edge spans, node and edge layers, last-third shares, path lengths; easy vs hard
    anchors and CUD thirds (Mann-Whitney U, Cliff's delta); Spearman with CUD and outcomes."""
    from rich import box
    from rich.table import Table

    from cud.analysis import analyze_structure
    from cud.circuits.structure import STATISTICS, structure_statistics
    from cud.report.inputs import load_report_inputs

    if not 0 < fraction <= 0.5:
        fail(f"--fraction must be in (0, 0.5], got {fraction}")
    if not 0 < alpha < 1:
        fail(f"--alpha must be in (0, 1), got {alpha}")
    try:
        inputs = load_report_inputs(circuits=circuits, cud=scores, distance=distance,
                                    anchors=anchors, unlearn=outcomes,
                                    methods=_csv_list(method))
        with console.status("structure statistics"):
            stats = structure_statistics(inputs.graph, inputs.circuits, ids=inputs.ids)
        difficulties = {}
        if inputs.outcomes:
            from cud.difficulty.groundtruth import difficulty
            for name in _csv_list(outcome) or []:
                for m, table in inputs.outcomes.items():
                    difficulties[f"{m} {name}"] = difficulty(table, name, source=m)
        cud = inputs.cud["cud"].astype(float) if inputs.cud is not None else None
        result = analyze_structure(stats, anchors=inputs.anchors, cud=cud,
                                   difficulties=difficulties, fraction=fraction, alpha=alpha)
        result.save(out)
    except CudError as e:
        fail(str(e))

    g = inputs.graph
    short = {"not significant": "n.s.", "no claim": "", "too few samples": "too few"}
    styles = {"agrees": "green", "opposite": "red"}

    def shown(v: str) -> str:
        return f"[{styles[v]}]{v}[/]" if v in styles else short.get(v, v)

    table = Table(title=f"circuit structure, {len(stats)} samples, {g.n_layers} layers "
                        f"(↑ = the paper expects higher in hard; δ = Cliff's delta, + = higher "
                        f"in hard; verdicts Holm-adjusted at {alpha})",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("statistic", no_wrap=True)
    table.add_column("median", justify="right")
    groups = [(name, comparison) for name, comparison in
              (("anchors", result.anchors), ("cud", result.cud)) if comparison is not None]
    for name, _ in groups:
        easy, hard = (len(result.groups[name][k]) for k in ("easy", "hard"))
        table.add_column(f"{'anchors' if name == 'anchors' else 'CUD ⅓s'}\nδ {easy}v{hard}",
                         justify="right")
        table.add_column("verdict", min_width=8)
    rho = result.correlations
    with_cud = rho is not None and "cud" in set(rho["target"])
    if with_cud:
        table.add_column("ρ CUD", justify="right")
    for name in stats.columns:
        arrow = {1: " ↑", -1: " ↓"}.get(STATISTICS.get(name, ("", 0))[1], "")
        row = [name + arrow, f"{stats[name].median():.3g}"]
        for _, comparison in groups:
            d, v = comparison.loc[name, "cliffs_delta"], comparison.loc[name, "verdict"]
            row += ["–" if d != d else f"{d:+.2f}", shown(v)]
        if with_cud:
            r = rho[(rho["target"] == "cud") & (rho["statistic"] == name)]["rho"].iloc[0]
            row.append("–" if r != r else f"{r:+.2f}")
        table.add_row(*row)
    console.print(table)
    for target, counts in result.summary().items():
        console.print(f"{target}: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    for note in result.notes:
        console.print(f"[dim]{note}[/]")
    print(out)


@app.command()
def report(
    circuits: Optional[str] = typer.Option(None, help="Circuits folder (`cud circuits --out`)."),
    scores: Optional[str] = typer.Option(None, help="CUD scores (`cud score --out` folder or "
                                                    "its scores table)."),
    distance: Optional[str] = typer.Option(None, help="Which distance's CUD when --scores has "
                                                      "several (default: cosine)."),
    anchors: Optional[str] = typer.Option(None, help="Anchors folder (`cud anchors --out`) or "
                                                     "JSON file (default: the anchor_role "
                                                     "column of --scores)."),
    outcomes: Optional[str] = typer.Option(None, help="`cud unlearn` output folder."),
    method: Optional[str] = typer.Option(None, help="Methods of --outcomes (comma list) "
                                                    "(default: all)."),
    outcome: str = typer.Option("nll_after,nll_delta", help="Outcomes shown against CUD; the "
                                                            "first defines 'hard' for the ROC "
                                                            "curves."),
    baselines: Optional[str] = typer.Option(None, help="`cud baselines` folder or table."),
    data: Optional[str] = typer.Option(None, help="QA data, for the samples' text."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    draw: Optional[str] = typer.Option(None, help="Sample ids whose circuits to draw (comma "
                                                  "list) (default: the easiest and hardest "
                                                  "by CUD)."),
    top: int = typer.Option(10, help="Rows in the hardest and easiest sample tables."),
    title: str = typer.Option("CUD report", help="Title of the report."),
    out: str = typer.Option("cud-report", help="Output folder (report.html, figures/)."),
):
    """One self-contained HTML report (figures embedded) plus PNG files.

    Every input is optional; a section without its inputs is left out with a note."""
    from cud.report import build_report, load_report_inputs

    if top < 1:
        fail(f"--top must be at least 1, got {top}")
    if not any([circuits, scores, outcomes, baselines]):
        fail("nothing to report: give at least one of --circuits, --scores, --outcomes, "
             "--baselines")
    try:
        inputs = load_report_inputs(circuits=circuits, cud=scores, distance=distance,
                                    anchors=anchors, unlearn=outcomes,
                                    methods=_csv_list(method), baselines=baselines, data=data,
                                    split=split)
        with console.status("figures") as status:
            result = build_report(inputs, out, title=title, outcomes=_csv_list(outcome),
                                  draw=_csv_list(draw), n_extremes=top,
                                  progress=lambda name: status.update(f"figure: {name}"))
    except CudError as e:
        fail(str(e))
    console.print(f"{len(result.figures)} figures in {len(result.sections)} sections: "
                  f"{', '.join(result.sections) or 'none'}")
    for note in result.notes:
        console.print(f"[dim]{note}[/]")
    print(result.html)
