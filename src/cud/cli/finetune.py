"""Command `finetune`: teach a model a QA set until it knows it (as TOFU's starting model was
made), cached."""

from __future__ import annotations

from typing import Optional

import typer

from cud.cli.app import command, console
from cud.cli.common import say_text_cuts
from cud.cli.options import (default, max_tokens_option, out_folder, prefix_tokens_option,
                             settings_from, text_settings)
from cud.cli.render import progress_bars
from cud.errors import ConfigError
from cud.unlearning.finetune import FinetuneSettings

D = FinetuneSettings


@command
def finetune(
    model: str = typer.Option("smollm2", help="Model: bundled short name, HF folder or .gguf."),
    data: str = typer.Option("builtin", help="QA data: builtin[:N[:SEED]], .json/.jsonl/.csv, "
                                              "a dataset folder, or tofu:FOLDER[:FORGET[:RETAIN]] "
                                              "(forget and retain together)."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples (of each TOFU "
                                                   "split)."),
    retain_authors: Optional[int] = typer.Option(None, help="TOFU: teach only the first N "
                                                            "authors of the retain split."),
    prefix_tokens: Optional[int] = prefix_tokens_option(),
    max_tokens: Optional[int] = max_tokens_option(),
    lr: Optional[float] = typer.Option(None, help=f"Learning rate {default(D, 'lr')}."),
    epochs: Optional[float] = typer.Option(None, help=f"Epochs {default(D, 'epochs')}."),
    batch_size: Optional[int] = typer.Option(None, help=f"Batch size {default(D, 'batch_size')}."),
    lora: Optional[bool] = typer.Option(None, "--lora/--full",
                                        help="LoRA (merged) or full fine-tuning (default: full)."),
    lora_r: Optional[int] = typer.Option(None, help=f"LoRA rank {default(D, 'lora_r')}."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32",
                                        help="Matrix products in bfloat16 (fp32 weights and "
                                             "loss) (default: on a GPU only)."),
    seed: Optional[int] = typer.Option(None, help=f"Seed {default(D, 'seed')}."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: GPU if any)."),
    cache_dir: Optional[str] = typer.Option(None, help="Folder of fine-tuned models "
                                                       "(default: ~/.cache/cud/finetuned)."),
    force: bool = typer.Option(False, help="Train even when a cached folder exists."),
    out: Optional[str] = typer.Option(None, help="Also write the per-sample memorisation "
                                                 "table here (Parquet and CSV)."),
):
    """Teach a model a QA set until it knows it; reuse the folder when asked again."""
    from rich.table import Table

    from cud.data.prepare import load_run_data
    from cud.tables import save_table
    from cud.unlearning.finetune import finetune as run_finetune

    settings = settings_from(FinetuneSettings, lr=lr, epochs=epochs, batch_size=batch_size,
                             lora=lora, lora_r=lora_r, bf16=bf16, seed=seed,
                             cache_dir=cache_dir)
    text = text_settings(prefix_tokens, max_tokens)
    if out:  # refused before any work
        out_folder(out, inputs={"--data": data})
    if data.startswith("tofu:"):
        if split is not None:
            raise ConfigError(f"--split does not apply to TOFU data ({data}): its splits are "
                              f"named in the spec, tofu:FOLDER:FORGET:RETAIN")
        samples = load_run_data(data, limit=limit, retain_authors=retain_authors).taught
    else:
        from cud.data.prepare import load_samples
        samples = load_samples(data, split=split, limit=limit, text=text)
    say_text_cuts(samples, model)
    with progress_bars() as bar:
        result = run_finetune(model, samples, settings, device=device, force=force,
                              keep_model=False, progress=bar)
    if out:
        save_table(result.memorisation, out_folder(out) / "memorisation")
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
