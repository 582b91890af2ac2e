"""Command `unlearn`: every unlearning method on a forget set, with per-sample outcomes (the
ground truth CUD is judged against)."""

from __future__ import annotations

from typing import Optional

import typer

from cud.cli.app import command, console
from cud.cli.common import load_or_teach, say_text_cuts
from cud.cli.options import (csv_list, default, float_list, max_tokens_option, out_folder,
                             parse_params, prefix_tokens_option, settings_from, text_settings)
from cud.cli.render import progress_bars
from cud.unlearning.folder import UnlearningSettings

D = UnlearningSettings


@command
def unlearn(
    model: str = typer.Option("smollm2", help="The model that knows the data (or, with "
                                              "--finetune, the model to teach it first)."),
    data: str = typer.Option("builtin", help="QA data split into forget and retain sets by "
                                              "author (--forget-fraction), a TOFU spec "
                                              "tofu:FOLDER[:FORGET[:RETAIN]], or with --forget "
                                              "the retain set."),
    forget: Optional[str] = typer.Option(None, help="Forget-set file (then --data is the "
                                                    "retain set)."),
    forget_fraction: float = typer.Option(0.5, help="Share of the data's authors (id prefix "
                                                    "before '.') to forget."),
    retain_authors: Optional[int] = typer.Option(None, help="TOFU: keep only the first N "
                                                            "authors of the retain split."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples of --data."),
    prefix_tokens: Optional[int] = prefix_tokens_option(),
    max_tokens: Optional[int] = max_tokens_option(),
    method: Optional[str] = typer.Option(None, help="ga, graddiff, npo, simnpo, rmu, undial; a "
                                                    "comma-separated list, or 'all' "
                                                    f"{default(D, 'methods')}."),
    hyperparameters: Optional[str] = typer.Option(None, help="Table of the methods' "
                                                             "hyperparameters: quick or paper "
                                                             f"{default(D, 'hyperparameters')}."),
    param: list[str] = typer.Option([], help="Method hyperparameter NAME=VALUE (repeatable), "
                                             "e.g. alpha=2."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the table's)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs over the forget set."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (wins over epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Micro-batch size."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="Matrix products in "
                                                                   "bfloat16 (default: on a GPU "
                                                                   "only)."),
    eval_every: Optional[int] = typer.Option(None, help="Record every forget sample's NLL "
                                                        "every k steps (trajectory)."),
    eval_bf16: Optional[bool] = typer.Option(None, "--eval-bf16/--eval-fp32",
                                             help="Outcome evaluations in bfloat16 products, "
                                                  "each weight cast once per evaluation "
                                                  f"{default(D, 'eval_bf16')}."),
    answers: Optional[bool] = typer.Option(None, "--answers/--teacher-forced-only",
                                           help="Outcomes with greedy answers (ROUGE-L) and "
                                                "the truth ratio, or teacher-forced only (for "
                                                "sweeps of many runs) "
                                                f"{default(D, 'answers')}."),
    threshold: Optional[float] = typer.Option(None, help="A sample is forgotten once its "
                                                         "normalised answer probability is "
                                                         f"below this {default(D, 'threshold')}."),
    seed: int = typer.Option(0, help="Seed of the split and of training."),
    finetune_first: bool = typer.Option(False, "--finetune/--no-finetune",
                                        help="Fine-tune --model on the data first (cached)."),
    utility: Optional[bool] = typer.Option(None, "--utility/--no-utility",
                                           help="Also measure model utility (retain + general "
                                                "knowledge) after each method (default: on)."),
    utility_samples: Optional[int] = typer.Option(None, help="Utility on the first N retain "
                                                             "samples (default: all)."),
    eval_batch_size: Optional[int] = typer.Option(None, help="Samples per evaluation pass "
                                                             f"{default(D, 'eval_batch_size')}."),
    save_model: bool = typer.Option(False, help="Save each unlearned model in the output."),
    calibrate: Optional[str] = typer.Option(None, help="Methods whose learning rate is chosen "
                                                       "first (comma list, or 'all'): the "
                                                       "largest of --calibration-grid x the "
                                                       "method's rate whose retain NLL rise on a "
                                                       "held part of the retain set stays within "
                                                       "--retain-budget (default: none)."),
    retain_budget: Optional[float] = typer.Option(None, help="Mean retain NLL rise (nats) a "
                                                             "method may cost; above it the "
                                                             "method is flagged collapsed "
                                                             f"{default(D, 'retain_budget')}."),
    calibration_grid: Optional[str] = typer.Option(None, help="Multiples of the method's rate "
                                                              "tried by --calibrate "
                                                              f"{default(D, 'calibration_grid')}."),
    calibration_held: Optional[float] = typer.Option(None, help="Share of the retain set held "
                                                                "out of training to measure the "
                                                                "rise on (calibrated methods) "
                                                                f"{default(D, 'calibration_held')}"
                                                                "."),
    strategy: Optional[str] = typer.Option(None, help="How each method's loop spends its "
                                                      "steps: plain, reweight, curriculum, "
                                                      "focus, localize "
                                                      f"{default(D, 'strategy')}."),
    difficulty: Optional[str] = typer.Option(None, help="Difficulty per forget sample (higher "
                                                        "= harder) for reweight / curriculum: "
                                                        "TABLE:COLUMN of a .csv/.parquet with "
                                                        "an id column, or 'loss' (minus the "
                                                        "answer NLL before unlearning)."),
    circuits: Optional[str] = typer.Option(None, help="The forget set's circuits folder "
                                                      "(localize)."),
    curriculum_order: Optional[str] = typer.Option(None, help="easy-to-hard or hard-to-easy "
                                                              f"{default(D, 'curriculum_order')}"
                                                              "."),
    focus_every: Optional[int] = typer.Option(None, help="focus: steps between re-reads of "
                                                         "the forget probabilities "
                                                         f"{default(D, 'focus_every')}."),
    localize_k: Optional[int] = typer.Option(None, help="localize: components that move "
                                                        f"{default(D, 'localize_k')}."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU if any)."),
    out: str = typer.Option("cud-out/unlearning", help="Output folder (created, or resumed)."),
):
    """Unlearn a forget set with one or more methods; write per-sample outcomes."""
    from rich.table import Table

    from cud.data.prepare import forget_and_retain
    from cud.unlearning import METHODS
    from cud.unlearning.folder import unlearn_to_folder

    methods = None
    if method is not None:
        methods = tuple(METHODS) if method == "all" else tuple(m.lower() for m in
                                                               csv_list(method))
    chosen = methods or D().methods
    to_calibrate = None if calibrate is None else \
        tuple(chosen) if calibrate == "all" else tuple(m.lower() for m in csv_list(calibrate))
    settings = settings_from(UnlearningSettings, methods=methods, calibrate=to_calibrate,
                             retain_budget=retain_budget,
                             calibration_grid=float_list(calibration_grid, "--calibration-grid"),
                             calibration_held=calibration_held,
                             hyperparameters=hyperparameters, params=parse_params(param) or None,
                             lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                             grad_accum=grad_accum, bf16=bf16, eval_every=eval_every,
                             eval_bf16=eval_bf16, answers=answers, threshold=threshold,
                             utility=utility, utility_samples=utility_samples,
                             eval_batch_size=eval_batch_size, seed=seed,
                             save_model=save_model, strategy=strategy, difficulty=difficulty,
                             circuits=circuits, curriculum_order=curriculum_order,
                             focus_every=focus_every, localize_k=localize_k)
    folder = out_folder(out, inputs={"--data": data, "--forget": forget})
    sets = forget_and_retain(data, forget=forget, split=split, limit=limit,
                             forget_fraction=forget_fraction, retain_authors=retain_authors,
                             seed=seed, text=text_settings(prefix_tokens, max_tokens))
    say_text_cuts(sets.taught, model)
    lm = load_or_teach(model, sets.taught, finetune_first, device)
    with progress_bars() as bar:
        run = unlearn_to_folder(lm, sets.forget, sets.retain, folder, settings, progress=bar)
    how = "" if settings.strategy == "plain" else f", strategy {settings.strategy}"
    table = Table(title=f"per-sample NLL increase on the forget set ({len(sets.forget)} "
                        f"samples{how})")
    for col in ("method", "lr", "min", "q1", "median", "q3", "max",
                f"forgotten (p<{settings.threshold})", "retain ΔNLL", "held retain ΔNLL",
                "time"):
        table.add_column(col, justify="right")
    for row in run.summary.to_dict("records"):
        rise, held = row["retain_nll_delta"], row["retain_held_rise"]
        name = row["method"] + (" [bold red](collapsed)[/]" if row["collapsed"] else "")
        table.add_row(name, f"{row['lr']:.2g}",
                      *(f"{row[k]:.2f}" for k in ("min", "q1", "median", "q3", "max")),
                      f"{row['forgotten']:.0%}", "–" if rise is None else f"{rise:+.2f}",
                      "–" if held is None else f"{held:+.2f}",
                      "reused" if row["reused"] else f"{row['train_seconds']:.0f} s")
    console.print(table)
    collapsed = [r["method"] for r in run.summary.to_dict("records") if r["collapsed"]]
    if collapsed:
        console.print(f"[bold red]collapsed[/]: {', '.join(collapsed)} raised the retain NLL "
                      f"by more than {settings.retain_budget} nats: their outcomes describe a "
                      f"damaged model (calibrate them: --calibrate)", highlight=False)
    if run.agreement is not None:
        console.print("Spearman agreement of the methods' NLL increases:")
        console.print(run.agreement.round(2).to_string())
    print(folder)
