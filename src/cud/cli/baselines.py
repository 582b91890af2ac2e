"""Command `baselines`: the baseline difficulty metrics CUD must beat (loss, MRD, ...), each
computed before unlearning."""

from __future__ import annotations

from typing import Optional

import typer

from cud.cli.app import command, console
from cud.cli.common import load_or_teach, say_text_cuts
from cud.cli.options import (csv_list, default, distributed, max_tokens_option, out_folder,
                             prefix_tokens_option, ray_address_option, settings_from,
                             text_settings, workers_option)
from cud.cli.render import progress_bars
from cud.difficulty.baselines import BASELINE_METRICS, BaselineSettings

D = BaselineSettings


@command
def baselines(
    model: str = typer.Option("smollm2", help="The model before unlearning (or, with "
                                              "--finetune, the model to teach first)."),
    data: str = typer.Option("builtin", help="QA data to score (the forget split of a TOFU "
                                              "spec)."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples."),
    metrics: Optional[str] = typer.Option(None, help="Comma-separated: "
                                                     f"{', '.join(BASELINE_METRICS)}; or 'all' "
                                                     "(default: all)."),
    min_k: Optional[float] = typer.Option(None, help="Min-K% fraction of answer tokens "
                                                     f"{default(D, 'min_k')}."),
    mrd_k: Optional[int] = typer.Option(None, help="MRD: number of weight perturbations K "
                                                   f"{default(D, 'mrd_k')}; the MRD paper "
                                                   "uses 100."),
    mrd_sigma: Optional[float] = typer.Option(None, help="MRD: perturbation standard deviation "
                                                         f"σ {default(D, 'mrd_sigma')}."),
    mrd_tokens: Optional[str] = typer.Option(None, help="MRD over 'answer' tokens or 'all' "
                                                        f"tokens {default(D, 'mrd_tokens')}."),
    seed: Optional[int] = typer.Option(None, help="Seed of MRD's noise and of the random "
                                                  f"ranking {default(D, 'seed')}."),
    finetune_first: bool = typer.Option(False, "--finetune/--no-finetune",
                                        help="Fine-tune --model on --data first (cached)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU if any)."),
    prefix_tokens: Optional[int] = prefix_tokens_option(),
    max_tokens: Optional[int] = max_tokens_option(),
    out: str = typer.Option("cud-out/baselines", help="Output folder (resumable)."),
    workers: int = workers_option("samples"),
    ray_address: Optional[str] = ray_address_option(),
):
    """Baseline difficulty metrics of each sample before unlearning (loss, MRD, ...)."""
    from rich.table import Table

    from cud.data.prepare import load_samples
    from cud.difficulty.baselines import baselines_to_folder

    to_ray = distributed(workers, ray_address)  # refused before any work
    wanted = None if metrics in (None, "all") else tuple(csv_list(metrics))
    settings = settings_from(BaselineSettings, metrics=wanted, min_k=min_k, mrd_k=mrd_k,
                             mrd_sigma=mrd_sigma, mrd_tokens=mrd_tokens, seed=seed)
    folder = out_folder(out, inputs={"--data": data})
    samples = load_samples(data, split=split, limit=limit,
                           text=text_settings(prefix_tokens, max_tokens))
    say_text_cuts(samples, model)
    dtype = "float32" if "mrd" in settings.metrics else None
    with progress_bars() as bar:
        if to_ray:
            from cud.runtime.distributed import baseline_metrics_distributed
            from cud.folders import folder_lock
            from cud.tables import save_table
            if finetune_first:
                from cud.unlearning.finetune import finetune
                model = str(finetune(model, samples, device=device, keep_model=False,
                                     progress=bar).path)
            with folder_lock(folder):
                table = baseline_metrics_distributed(model, samples, settings,
                                                     work_dir=folder / ".work",
                                                     workers=workers, address=ray_address,
                                                     device=device, dtype=dtype, progress=bar)
                save_table(table, folder / "baselines")
        else:
            lm = load_or_teach(model, samples, finetune_first, device, dtype)
            table = baselines_to_folder(lm, samples, folder, settings, progress=bar)
    summary = Table(title=f"baseline difficulty metrics ({len(table)} samples)")
    for col in ("metric", "mean", "min", "median", "max", "high means"):
        summary.add_column(col, justify="right" if col not in ("metric", "high means") else "left")
    for name in table.columns:
        v = table[name]
        summary.add_row(name, f"{v.mean():.4g}", f"{v.min():.4g}", f"{v.median():.4g}",
                        f"{v.max():.4g}", BASELINE_METRICS[name].split(" (")[0])
    console.print(summary)
    print(folder)
