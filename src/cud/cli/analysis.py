"""Command `analyze`: the structure of the circuits against difficulty (the paper's mechanistic
claim)."""

from __future__ import annotations

from typing import Optional

import typer

from cud.analysis.stage import AnalysisSettings
from cud.cli.app import command, console
from cud.cli.options import csv_list, default, out_folder, settings_from

D = AnalysisSettings


@command
def analyze(
    circuits: str = typer.Option("cud-out/circuits", help="Circuits folder (`cud circuits "
                                                          "--out`)."),
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
    outcome: Optional[str] = typer.Option(None, help="Outcomes to correlate with (comma list) "
                                                     f"{default(D, 'outcomes')}."),
    fraction: Optional[float] = typer.Option(None, help="Share of samples in each of the "
                                                        "CUD-easy and CUD-hard groups "
                                                        "(default: 1/3)."),
    alpha: Optional[float] = typer.Option(None, help="Significance level (Holm-adjusted "
                                                     f"p-values) {default(D, 'alpha')}."),
    out: str = typer.Option("cud-out/analysis", help="Output folder."),
):
    """Circuit structure, and whether easy and hard samples differ as the paper says.

    Per circuit: edge spans, node and edge layers, last-third shares, path lengths; easy vs hard
    anchors and CUD thirds (Mann-Whitney U, Cliff's delta); Spearman with CUD and outcomes."""
    from rich import box
    from rich.table import Table

    from cud.analysis.stage import analyze_to_folder
    from cud.circuits.store import load_circuits
    from cud.circuits.structure import STATISTICS
    from cud.report.inputs import load_report_inputs

    settings = settings_from(AnalysisSettings,
                             outcomes=tuple(csv_list(outcome)) if outcome else None,
                             fraction=fraction, alpha=alpha)
    folder = out_folder(out, inputs={"--circuits": circuits, "--scores": scores,
                                     "--anchors": anchors, "--outcomes": outcomes})
    inputs = load_report_inputs(cud=scores, distance=distance, anchors=anchors,
                                unlearn=outcomes, methods=csv_list(method))
    cs = load_circuits(circuits)
    cud = inputs.cud["cud"].astype(float) if inputs.cud is not None else None
    with console.status("structure statistics"):
        result = analyze_to_folder(cs, folder, settings, anchors=inputs.anchors, cud=cud,
                                   outcomes=inputs.outcomes)
    stats = result.statistics
    short = {"not significant": "n.s.", "no claim": "", "too few samples": "too few"}
    styles = {"agrees": "green", "opposite": "red"}

    def shown(v: str) -> str:
        return f"[{styles[v]}]{v}[/]" if v in styles else short.get(v, v)

    table = Table(title=f"circuit structure, {len(stats)} samples, {cs.graph.n_layers} layers "
                        f"(↑ = the paper expects higher in hard; δ = Cliff's delta, + = higher "
                        f"in hard; verdicts Holm-adjusted at {settings.alpha})",
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
    print(folder)
