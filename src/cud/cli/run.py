"""Command `run`: the main job, the whole pipeline on built-in defaults or a config file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cud.cli.app import command, console
from cud.cli.options import csv_list


@command
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="A .toml or .yaml file setting any stage option."),
    preset: Optional[str] = typer.Option(None, help="default, quick (a small complete run), "
                                                    "paper (METHOD's hyperparameters) or tofu "
                                                    "(the paper's TOFU experiment, on a CPU)."),
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
    seed: Optional[int] = typer.Option(None, help="Seed of the split, the corrupted prompts, "
                                                  "training, anchors and bootstrap."),
    strategy: Optional[str] = typer.Option(None, help="After the plain methods, unlearn again "
                                                      "with this strategy (reweight, "
                                                      "curriculum, focus, localize) and compare "
                                                      "(default: none)."),
    strategy_difficulty: Optional[str] = typer.Option(None, help="The strategy's difficulty: "
                                                                 "cud, loss or TABLE:COLUMN "
                                                                 "(default: cud)."),
):
    """The whole pipeline: fine-tune, circuits, unlearning, anchors, CUD, validation, report."""
    from cud.cli.render import progress_bars
    from cud.config import load_config
    from cud.workflow import run as run_pipeline

    overrides = dict(model=model, data=data, limit=limit, out=out, device=device, dtype=dtype,
                     seed=seed, strategy=strategy, strategy_difficulty=strategy_difficulty)
    if methods:
        overrides["unlearning"] = {"methods": csv_list(methods)}
    cfg = load_config(config, {k: v for k, v in overrides.items() if v is not None},
                      preset=preset)
    _say_text_cuts(cfg)
    with progress_bars(transient=False) as bar:
        result = run_pipeline(cfg, progress=bar)
    _summary(result)
    print(result.report or result.out)


def _say_text_cuts(cfg) -> None:
    """The lines of :func:`cud.cli.common.say_text_cuts` for the run's data, read here as the
    pipeline will (texts come only from data files: nothing is read for builtin or TOFU data)."""
    from cud.data.formats import BUILTIN
    from cud.data.tofu import PREFIX as TOFU_PREFIX
    spec = str(cfg.data)
    if spec == BUILTIN or spec.startswith((BUILTIN + ":", TOFU_PREFIX)):
        return
    from cud.cli.common import say_text_cuts
    from cud.data.prepare import load_run_data
    data = load_run_data(spec, limit=cfg.limit, retain_authors=cfg.retain_authors,
                         forget_fraction=cfg.forget_fraction, seed=cfg.seed, text=cfg.text)
    say_text_cuts(data.taught, cfg.model)


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
    if result.strategy is not None and not result.strategy.empty:
        console.print("plain against the strategy (share forgotten, hard quartile, retain NLL "
                      "rise, paired p; strategy-*/comparison.csv):")
        console.print(result.strategy.round(3).to_string(index=False))
    if result.report:
        console.print(f"report: {result.report}")
