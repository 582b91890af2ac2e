"""Command `report`: one self-contained HTML file (figures embedded) plus PNG files."""

from __future__ import annotations

from typing import Optional

import typer

from cud.cli.app import command, console
from cud.cli.options import csv_list, default, ids_or_file, out_folder, settings_from
from cud.errors import ConfigError
from cud.report.html import ReportSettings

D = ReportSettings


@command
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
    outcome: Optional[str] = typer.Option(None, help="Outcomes shown against CUD; the first "
                                                     "defines 'hard' for the ROC curves "
                                                     f"{default(D, 'outcomes')}."),
    baselines: Optional[str] = typer.Option(None, help="`cud baselines` folder or table."),
    validation: Optional[str] = typer.Option(None, help="`cud validate` folder: the verdict "
                                                        "and held-out tables."),
    data: Optional[str] = typer.Option(None, help="QA data, for the samples' text."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    draw: Optional[str] = typer.Option(None, help="Sample ids whose circuits to draw: a comma "
                                                  "list, or @FILE with one id a line (ids "
                                                  "holding commas) (default: the easiest and "
                                                  "hardest by CUD)."),
    top: Optional[int] = typer.Option(None, help="Rows in the hardest and easiest sample "
                                                 f"tables {default(D, 'n_extremes')}."),
    title: Optional[str] = typer.Option(None, help=f"Title {default(D, 'title')}."),
    out: str = typer.Option("cud-out/report", help="Output folder (report.html, figures/)."),
):
    """One self-contained HTML report (figures embedded) plus PNG files.

    Every input is optional; a section without its inputs is left out with a note."""
    from cud.report import build_report, load_report_inputs

    settings = settings_from(ReportSettings, title=title, n_extremes=top,
                             outcomes=tuple(csv_list(outcome)) if outcome else None)
    if not any([circuits, scores, outcomes, baselines, validation]):
        raise ConfigError("nothing to report: give at least one of --circuits, --scores, "
                          "--outcomes, --baselines, --validation")
    folder = out_folder(out, inputs={"--circuits": circuits, "--scores": scores,
                                     "--anchors": anchors, "--outcomes": outcomes,
                                     "--baselines": baselines, "--validation": validation,
                                     "--data": data},
                        writes=("figures", "tables", "report.html"))
    inputs = load_report_inputs(circuits=circuits, cud=scores, distance=distance,
                                anchors=anchors, unlearn=outcomes, methods=csv_list(method),
                                baselines=baselines, validation=validation, data=data,
                                split=split)
    with console.status("figures") as status:
        result = build_report(inputs, folder, title=settings.title, outcomes=settings.outcomes,
                              draw=ids_or_file(draw, "--draw"), n_extremes=settings.n_extremes,
                              progress=lambda task, done, total, info: status.update(
                                  f"figure: {info}"))
    console.print(f"{len(result.figures)} figures in {len(result.sections)} sections: "
                  f"{', '.join(result.sections) or 'none'}")
    for note in result.notes:
        console.print(f"[dim]{note}[/]")
    print(result.html)
