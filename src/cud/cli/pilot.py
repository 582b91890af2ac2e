"""Command `pilot`: each unlearning method run for a few of its steps, each sample's NLL rise
at several fractions of them: the method's own difficulty forecast, with its price."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cud.cli.app import command, console
from cud.cli.common import load_or_teach, say_text_cuts
from cud.cli.options import (csv_list, default, float_list, max_tokens_option, out_folder,
                             parse_params, prefix_tokens_option, settings_from, text_settings)
from cud.cli.render import progress_bars
from cud.difficulty.pilot import PilotSettings
from cud.errors import ConfigError
from cud.unlearning.folder import UnlearningSettings

D = PilotSettings


def _calibrated(folder: str, methods: tuple[str, ...]) -> tuple[dict, dict[str, float]]:
    """The calibration settings and rates of the calibrated methods of an unlearning folder:
    a pilot of such a method runs at its rate, on the retain samples it trained on."""
    from cud.difficulty.pilot import calibrated_rates
    rates = {m: r for m, r in calibrated_rates(folder).items() if m in methods}
    found = {}
    for m in rates:
        request = json.loads((Path(folder) / m / "settings.json").read_text())["request"]
        found[m] = request["calibration"]
    held = {c["held"] for c in found.values()}
    if len(held) > 1:
        raise ConfigError(f"{folder}: its calibrated methods held different shares of the "
                          f"retain set ({sorted(held)}); pilot them one at a time")
    changes = {"calibrate": tuple(rates)}
    if found:
        first = next(iter(found.values()))
        changes.update(calibration_held=first["held"], retain_budget=first["budget"],
                       calibration_grid=tuple(first["grid"]))
    return changes, rates


@command
def pilot(
    model: str = typer.Option("smollm2", help="The model that knows the data (or, with "
                                              "--finetune, the model to teach it first)."),
    data: str = typer.Option("builtin", help="QA data split into forget and retain sets as "
                                              "`cud unlearn` splits it, or a TOFU spec."),
    forget: Optional[str] = typer.Option(None, help="Forget-set file (then --data is the "
                                                    "retain set)."),
    forget_fraction: float = typer.Option(0.5, help="Share of the data's authors to forget."),
    retain_authors: Optional[int] = typer.Option(None, help="TOFU: keep only the first N "
                                                            "authors of the retain split."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples of --data."),
    method: Optional[str] = typer.Option(None, help="Methods to pilot (comma list, or 'all') "
                                                    f"{default(UnlearningSettings, 'methods')}."),
    fractions: Optional[str] = typer.Option(None, help="Shares of the method's steps at which "
                                                       "the NLL rise is read (one run, stopped "
                                                       "at the largest) "
                                                       f"{default(D, 'fractions')}."),
    hyperparameters: Optional[str] = typer.Option(None, help="Table of the methods' "
                                                             "hyperparameters (as `cud "
                                                             "unlearn`)."),
    param: list[str] = typer.Option([], help="Method hyperparameter NAME=VALUE (repeatable)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the table's)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs of the full run."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps of the full run."),
    batch_size: Optional[int] = typer.Option(None, help="Micro-batch size."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="Matrix products in "
                                                                   "bfloat16 (as the full run)."),
    group_by_length: Optional[bool] = typer.Option(None, "--group-by-length/--random-order",
                                                   help="Batches as the full run forms them "
                                                        "(default: random order)."),
    eval_batch_size: Optional[int] = typer.Option(None, help="Samples per evaluation pass."),
    unlearning: Optional[str] = typer.Option(None, help="`cud unlearn` folder whose calibrated "
                                                        "methods are piloted at their chosen "
                                                        "rate, on the retain samples they "
                                                        "trained on."),
    seed: int = typer.Option(0, help="Seed of the split and of training (the full run's)."),
    finetune_first: bool = typer.Option(False, "--finetune/--no-finetune",
                                        help="Fine-tune --model on the data first (cached)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU if any)."),
    prefix_tokens: Optional[int] = prefix_tokens_option(),
    max_tokens: Optional[int] = max_tokens_option(),
    out: str = typer.Option("cud-out/pilots", help="Output folder (created, or resumed)."),
):
    """Pilot each method: a fraction of its steps, each sample's NLL rise (its forecast)."""
    from rich.table import Table

    from cud.data.prepare import forget_and_retain
    from cud.difficulty.pilot import pilots_to_folder
    from cud.unlearning import METHODS

    methods = None
    if method is not None:
        methods = tuple(METHODS) if method == "all" else tuple(m.lower() for m in
                                                               csv_list(method))
    settings = settings_from(PilotSettings, fractions=float_list(fractions, "--fractions"))
    base = settings_from(UnlearningSettings, methods=methods, hyperparameters=hyperparameters,
                         params=parse_params(param) or None, lr=lr, epochs=epochs,
                         max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                         bf16=bf16, group_by_length=group_by_length,
                         eval_batch_size=eval_batch_size, seed=seed)
    rates = {}
    if unlearning is not None:
        changes, rates = _calibrated(unlearning, base.methods)
        base = settings_from(UnlearningSettings, base, **changes)
    folder = out_folder(out, inputs={"--data": data, "--forget": forget,
                                     "--unlearning": unlearning})
    sets = forget_and_retain(data, forget=forget, split=split, limit=limit,
                             forget_fraction=forget_fraction, retain_authors=retain_authors,
                             seed=seed, text=text_settings(prefix_tokens, max_tokens))
    say_text_cuts(sets.taught, model)
    lm = load_or_teach(model, sets.taught, finetune_first, device)
    with progress_bars() as bar:
        run = pilots_to_folder(lm, sets.forget, sets.retain, folder, settings, base,
                               rates=rates, progress=bar)
    table = Table(title=f"pilots ({len(sets.forget)} forget samples): NLL rise at each "
                        f"fraction of the steps")
    for col in ("method", "score", "step", "median rise", "s / sample", ""):
        table.add_column(col, justify="left" if col in ("method", "score", "") else "right")
    for row in run.summary().to_dict("records"):
        rise = run.scores[row["method"]][row["score"]]
        table.add_row(row["method"], row["score"], f"{row['step']} of {row['of_steps']}",
                      f"{rise.median():+.3f}", f"{row['seconds_per_sample']:.3g}",
                      "reused" if row["reused"] else "")
    console.print(table)
    print(folder)
