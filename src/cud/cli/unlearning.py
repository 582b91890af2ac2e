"""Commands `finetune`, `unlearn` and `baselines`: the ground truth CUD is judged against."""

from __future__ import annotations

from typing import Optional

import typer

from cud.cli.app import app, console, fail
from cud.cli.common import (finetune_config, load, parse_params, progress_bar, run_finetune,
                             samples_for)
from cud.errors import CudError


@app.command()
def finetune(
    model: str = typer.Option("smollm2", help="Model: bundled short name, HF folder or .gguf."),
    data: str = typer.Option("builtin", help="QA data: builtin[:N[:SEED]], .json/.jsonl/.csv, "
                                              "or a dataset folder."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: 3e-4)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (default: 6)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default: 10)."),
    lora: bool = typer.Option(False, "--lora/--full", help="LoRA (merged) or full fine-tuning."),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank (default: 16)."),
    seed: Optional[int] = typer.Option(None, help="Seed (default: 0)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: GPU if any)."),
    cache_dir: Optional[str] = typer.Option(None, help="Folder of fine-tuned models "
                                                       "(default: ~/.cache/cud/finetuned)."),
    force: bool = typer.Option(False, help="Train even when a cached folder exists."),
    out: Optional[str] = typer.Option(None, help="Also write the per-sample memorisation "
                                                 "table here (Parquet and CSV)."),
):
    """Teach a model a QA set until it knows it; reuse the folder when asked again."""
    from rich.table import Table
    try:
        samples = samples_for(data, split, limit)
        config = finetune_config(lr, epochs, batch_size, lora, lora_r, seed)
        result = run_finetune(model, samples, config, cache_dir, device, force,
                               keep_model=False)
        if out:
            from pathlib import Path
            from cud.unlearning.outcomes import save_table
            save_table(result.memorisation, Path(out) / "memorisation")
    except CudError as e:
        fail(str(e))
    rep = result.report
    table = Table(title="memorisation of the taught set")
    table.add_column("")
    for col in ("exact memorisation", "fully memorised", "answer probability", "answer NLL"):
        table.add_column(col, justify="right")
    for name in ("before", "after"):
        r = rep[name]
        table.add_row(name, f"{r['exact_mem']:.3f}", f"{r['fully_memorised']:.0%}",
                      f"{r['prob']:.3f}", f"{r['nll']:.3f}")
    console.print(table)
    how = "reused" if result.reused else f"trained in {rep['train_seconds']:.0f} s"
    console.print(f"{rep['samples']} samples, {rep['steps']} steps, {how}")
    print(result.path)


@app.command()
def unlearn(
    model: str = typer.Option("smollm2", help="The model that knows the data (or, with "
                                              "--finetune, the model to teach it first)."),
    data: str = typer.Option("builtin", help="QA data split into forget and retain sets by "
                                              "--forget-fraction (unless --forget is given)."),
    forget: Optional[str] = typer.Option(None, help="Forget-set file (then --data is the "
                                                    "retain set)."),
    forget_fraction: float = typer.Option(0.5, help="Share of the data's authors (id prefix "
                                                    "before '.') to forget."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples of --data."),
    method: str = typer.Option("graddiff", help="ga, graddiff, npo, simnpo, rmu, undial; a "
                                                "comma-separated list, or 'all'."),
    preset: str = typer.Option("quick", help="Hyperparameter preset: quick or paper."),
    param: list[str] = typer.Option([], help="Method hyperparameter NAME=VALUE (repeatable), "
                                             "e.g. alpha=2."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the preset's)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs over the forget set."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (wins over epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Micro-batch size."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps."),
    eval_every: Optional[int] = typer.Option(None, help="Record every forget sample's NLL "
                                                        "every k steps (trajectory)."),
    threshold: float = typer.Option(0.1, help="A sample is forgotten once its normalised "
                                              "answer probability is below this."),
    seed: int = typer.Option(0, help="Seed of the split and of training."),
    finetune_first: bool = typer.Option(False, "--finetune/--no-finetune",
                                        help="Fine-tune --model on --data first (cached)."),
    utility: bool = typer.Option(False, help="Also measure model utility (retain + general "
                                             "knowledge) after each method."),
    save_model: bool = typer.Option(False, help="Save each unlearned model in the output."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU if any)."),
    out: str = typer.Option("cud-unlearn", help="Output folder."),
):
    """Unlearn a forget set with one or more methods; write per-sample outcomes."""
    import json
    from dataclasses import replace as _replace
    from pathlib import Path

    from rich.table import Table

    from cud.data import load_qa
    from cud.unlearning import (METHODS, evaluate_outcomes, general_knowledge, model_utility,
                                preset as get_preset, save_table, split_forget_retain, spread)
    from cud.unlearning import unlearn as run_unlearning
    from cud.unlearning.outcomes import add_perturbed_answers, has_perturbations

    names = list(METHODS) if method == "all" else [m.strip().lower() for m in method.split(",")]
    for name in names:
        if name not in METHODS:
            fail(f"unknown unlearning method '{name}' (choose from {', '.join(METHODS)}, all)")
    hyper = parse_params(param)
    out_dir = Path(out)
    summary = []
    try:
        samples = samples_for(data, split, limit)
        if forget:
            forget_set, retain_set = load_qa(forget), samples
            if not any(has_perturbations(s) for s in forget_set):
                forget_set = add_perturbed_answers(forget_set + retain_set)[:len(forget_set)]
        else:
            forget_set, retain_set = split_forget_retain(samples, forget_fraction, seed=seed)
        if finetune_first:
            ft = run_finetune(model, forget_set + retain_set if forget else samples,
                               finetune_config(None, None, None, False, None, None), None,
                               device, False, keep_model=True)
            lm = ft.model
        else:
            lm = load(model, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        with console.status("outcomes before unlearning"):
            before = evaluate_outcomes(lm, forget_set)
        save_table(before, out_dir / "before")
        deltas = {}
        for name in names:
            hp, train = get_preset(name, preset)
            changes = {k: v for k, v in dict(lr=lr, epochs=epochs, max_steps=max_steps,
                                             batch_size=batch_size, grad_accum=grad_accum,
                                             seed=seed).items() if v is not None}
            train = _replace(train, **changes)
            known = {k: v for k, v in hyper.items()
                     if k in {f for f in METHODS[name].__dataclass_fields__}}
            mdir = out_dir / name
            mdir.mkdir(exist_ok=True)
            traj = mdir / "trajectory.csv"
            traj.unlink(missing_ok=True)

            def sink(frame, path=traj):
                frame.to_csv(path, mode="a", header=not path.exists(), index=False)

            with progress_bar() as bar:
                task = bar.add_task(f"unlearning: {name}", total=None, info="")
                result = run_unlearning(
                    lm, forget_set, retain_set, method=name, preset_name=preset,
                    hyperparameters={**hp, **known}, train_config=train, eval_every=eval_every,
                    forget_threshold=threshold, before=before, evaluate_retain=True,
                    trajectory_sink=sink,
                    progress=lambda s, t, row, task=task: bar.update(
                        task, completed=s, total=t, info=f"loss {row['loss']:.3f}"))
            table = result.per_sample()
            save_table(table, mdir / "outcomes")
            save_table(result.after, mdir / "after")
            settings = dict(result.settings, train_seconds=round(result.log.seconds, 2),
                            model=model)
            retain_rise = float((result.retain_after["nll"]
                                 - result.retain_before["nll"]).mean())
            settings["retain_nll_delta_mean"] = retain_rise
            if utility:
                with console.status(f"model utility after {name}"):
                    settings["utility"] = model_utility(
                        result.model, {"retain": retain_set, "general": general_knowledge()})
            (mdir / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
            if save_model:
                from cud.unlearning.finetune import save_hf_folder
                save_hf_folder(result.model.model, result.model.tokenizer, mdir / "model")
            deltas[name] = table["nll_delta"]
            s = spread(table["nll_delta"])
            forgotten = float((result.after["prob"] < threshold).mean())
            summary.append((name, s, forgotten, retain_rise, result.log.seconds))
            del result
        if len(deltas) > 1:
            import pandas as pd
            agreement = pd.DataFrame(deltas).corr(method="spearman")
            agreement.to_csv(out_dir / "agreement_nll_delta.csv")
    except CudError as e:
        fail(str(e))
    table = Table(title=f"per-sample NLL increase on the forget set ({len(forget_set)} samples)")
    for col in ("method", "min", "q1", "median", "q3", "max", f"forgotten (p<{threshold})",
                "retain ΔNLL", "time"):
        table.add_column(col, justify="right")
    for name, s, forgotten, retain_rise, secs in summary:
        table.add_row(name, *(f"{s[k]:.2f}" for k in ("min", "q1", "median", "q3", "max")),
                      f"{forgotten:.0%}", f"{retain_rise:+.2f}", f"{secs:.0f} s")
    console.print(table)
    if len(deltas) > 1:
        console.print("Spearman agreement of the methods' NLL increases:")
        console.print(agreement.round(2).to_string())
    print(out_dir)


@app.command()
def baselines(
    model: str = typer.Option("smollm2", help="The model before unlearning (or, with "
                                              "--finetune, the model to teach first)."),
    data: str = typer.Option("builtin", help="QA data to score."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples."),
    metrics: str = typer.Option("all", help="Comma-separated: loss, prob, exact_mem, "
                                            "min_k_prob, grad_norm, mrd, random; or 'all'."),
    min_k: float = typer.Option(0.2, help="Min-K% fraction of answer tokens."),
    mrd_k: int = typer.Option(100, help="MRD: number of weight perturbations K."),
    mrd_sigma: float = typer.Option(1e-5, help="MRD: perturbation standard deviation σ."),
    mrd_tokens: str = typer.Option("answer", help="MRD over 'answer' tokens or 'all' tokens."),
    seed: int = typer.Option(0, help="Seed of MRD's noise and of the random ranking."),
    finetune_first: bool = typer.Option(False, "--finetune/--no-finetune",
                                        help="Fine-tune --model on --data first (cached)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU if any)."),
    out: str = typer.Option("cud-baselines", help="Output folder (resumable)."),
    workers: int = typer.Option(1, help="Ray workers to shard the samples over (1: this "
                                        "process; needs cud[ray] otherwise)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to run on ('auto', "
                                                         "'ray://host:10001'); OUT must be on "
                                                         "storage every node shares."),
):
    """Baseline difficulty metrics of each sample before unlearning (loss, MRD, ...)."""
    from pathlib import Path

    from rich.table import Table

    from cud.difficulty.baselines import BASELINES, baseline_metrics
    from cud.unlearning.outcomes import save_table

    wanted = list(BASELINES) if metrics == "all" else [m.strip() for m in metrics.split(",")]
    out_dir = Path(out)
    if workers < 1:
        fail(f"--workers must be at least 1, got {workers}")
    distributed = workers > 1 or ray_address is not None
    dtype = "float32" if "mrd" in wanted else None
    try:
        samples = samples_for(data, split, limit)
        if finetune_first:
            ft = run_finetune(model, samples, finetune_config(None, None, None, False, None,
                                                               None),
                              None, device, False, keep_model=not distributed)
            lm, model = ft.model, str(ft.path)
        elif not distributed:
            lm = load(model, device, dtype=dtype)
        with progress_bar() as bar:
            tasks = {}

            def progress(name, done, total):
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total, info="")
                bar.update(tasks[name], completed=done)

            if distributed:
                from cud.runtime.distributed import baseline_metrics_distributed
                table = baseline_metrics_distributed(
                    model, samples, metrics=wanted, min_k=min_k, mrd_sigma=mrd_sigma,
                    mrd_k=mrd_k, mrd_tokens=mrd_tokens, seed=seed, work_dir=out_dir / ".work",
                    workers=workers, address=ray_address, device=device, dtype=dtype,
                    progress=progress)
            else:
                table = baseline_metrics(lm, samples, metrics=wanted, min_k=min_k,
                                         mrd_sigma=mrd_sigma, mrd_k=mrd_k, mrd_tokens=mrd_tokens,
                                         seed=seed, work_dir=out_dir / ".work",
                                         progress=progress)
        save_table(table, out_dir / "baselines")
    except CudError as e:
        fail(str(e))
    summary = Table(title=f"baseline difficulty metrics ({len(table)} samples)")
    for col in ("metric", "mean", "min", "median", "max", "high means"):
        summary.add_column(col, justify="right" if col not in ("metric", "high means") else "left")
    for name in table.columns:
        v = table[name]
        summary.add_row(name, f"{v.mean():.4g}", f"{v.min():.4g}", f"{v.median():.4g}",
                        f"{v.max():.4g}", BASELINES[name].split(" (")[0])
    console.print(summary)
    print(out_dir)
