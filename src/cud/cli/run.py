"""Command `run`: the main job, the whole pipeline on built-in defaults or a config file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cud.cli.app import app, console, fail
from cud.errors import CudError


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="A .toml or .yaml file setting any stage option."),
    preset: Optional[str] = typer.Option(None, help="default or quick (a small complete run)."),
    model: Optional[str] = typer.Option(None, help="Model (default: smollm2): bundled short "
                                                   "name, HF folder or .gguf."),
    data: Optional[str] = typer.Option(None, help="QA data (default: builtin), or "
                                                  "tofu:FOLDER[:FORGET[:RETAIN]]."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples (of each "
                                                   "TOFU split)."),
    methods: Optional[str] = typer.Option(None, help="Unlearning methods, comma list "
                                                     "(default: graddiff,npo)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: cud-out)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: GPU if any)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 (default: fp32 on CPU, "
                                                   "bf16 on GPU)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the split, anchors and bootstrap."),
):
    """The whole pipeline: fine-tune, circuits, unlearning, anchors, CUD, validation, report."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    from cud.config import load_config
    from cud.workflow import run as run_pipeline

    overrides = dict(model=model, data=data, limit=limit, out=out, device=device, dtype=dtype,
                     seed=seed)
    if methods:
        overrides["unlearning"] = {"methods": [m.strip() for m in methods.split(",")]}
    try:
        cfg = load_config(config, {k: v for k, v in overrides.items() if v is not None},
                          preset=preset)
        with Progress(TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                      transient=False) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total, info: str) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total, info="")
                bar.update(tasks[stage], completed=done, total=total, info=info[:60])

            result = run_pipeline(cfg, progress=progress)
    except CudError as e:
        fail(str(e))
    _summary(result)
    print(result.report or result.out)


def _summary(result) -> None:
    from rich.table import Table

    t = Table(title=f"cud run: {result.n_forget} forget / {result.n_retain} retain samples, "
                    f"{sum(result.seconds.values()):.0f} s", title_justify="left")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for stage, secs in result.seconds.items():
        t.add_row(stage, f"{secs:.1f}")
    console.print(t)
    h = result.heldout
    if h is not None and not h.empty:
        first = h["outcome"].iloc[0]
        rows = h[h["outcome"] == first]
        piv = rows.pivot_table(index="metric", columns="method", values="spearman")
        console.print(f"held-out Spearman ρ of each difficulty metric with each method's "
                      f"difficulty ({first}; intervals in validation/heldout.csv):")
        console.print(piv.round(2).to_string())
    if result.report:
        console.print(f"report: {result.report}")
