"""Command `circuits`: per-sample circuits of a QA set, written to an output folder."""

from __future__ import annotations

from typing import Optional

import typer

from cud.circuits.settings import CircuitSettings
from cud.cli.app import command, console
from cud.cli.common import load, say_text_cuts
from cud.cli.options import (default, distributed, max_tokens_option, out_folder,
                             prefix_tokens_option, ray_address_option, settings_from,
                             text_settings, workers_option)
from cud.cli.render import progress_bars

D = CircuitSettings


@command
def circuits(
    model: str = typer.Option("smollm2", help="Model: bundled short name, HF folder or .gguf."),
    data: str = typer.Option("builtin", help="QA data: builtin[:N[:SEED]], .json/.jsonl/.csv, "
                                              "a dataset folder, or the forget split of "
                                              "tofu:FOLDER[:FORGET[:RETAIN]]."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples."),
    prefix_tokens: Optional[int] = prefix_tokens_option(),
    max_tokens: Optional[int] = max_tokens_option(),
    out: str = typer.Option("cud-out/circuits", help="Output folder (created, or resumed)."),
    method: Optional[str] = typer.Option(None, help="eap, eap-ig-inputs, eap-ig-activations or "
                                                    "eap-ig-activations-by-layer (the reference "
                                                    "code's schedule: 2L+1 times the passes) "
                                                    f"{default(D, 'method')}."),
    steps: Optional[int] = typer.Option(None, help=f"Integration steps of eap-ig-* "
                                                   f"{default(D, 'steps')}."),
    metric: Optional[str] = typer.Option(None, help=f"kl or logprob {default(D, 'metric')}."),
    ablation: Optional[str] = typer.Option(None, help="What a patched edge carries: corrupt "
                                                      "(question tokens replaced), zero (not "
                                                      "with eap-ig-activations) or mean (needs "
                                                      f"--reference) {default(D, 'ablation')}."),
    draws: Optional[int] = typer.Option(None, help="Corrupted prompts averaged per sample "
                                                   f"{default(D, 'draws')}."),
    reference: Optional[str] = typer.Option(None, help="Reference QA data of the mean ablation."),
    convention: Optional[str] = typer.Option(None, help="cud (input path from the corrupted "
                                                        "prompt, m+1 points) or reference "
                                                        "(hannamw/EAP-IG exactly: m points, "
                                                        "token-only input, constant replacement "
                                                        f"by layer) {default(D, 'convention')}."),
    selection: Optional[str] = typer.Option(None, help="greedy, topn or threshold "
                                                       f"{default(D, 'selection')}."),
    n_edges: Optional[int] = typer.Option(None, help="Circuit size for greedy and topn "
                                                     f"{default(D, 'n_edges')}."),
    threshold: Optional[float] = typer.Option(None, help="|score| threshold for 'threshold'."),
    faithful: Optional[bool] = typer.Option(None, "--faithfulness/--no-faithfulness",
                                            help="Measure each circuit's faithfulness (one more "
                                                 "pass) (default: on)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per pass; part of the result "
                                                        f"{default(D, 'batch_size')}."),
    seed: Optional[int] = typer.Option(None, help=f"Seed of the corrupted prompts "
                                                  f"{default(D, 'seed')}; another seed is an "
                                                  f"independent measurement (test-retest)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: GPU if any)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16 "
                                                   "(default: fp32 on CPU, bf16 on GPU)."),
    export_json: bool = typer.Option(False, help="Also write every circuit as EAP-IG JSON "
                                                 "(OUT/json/<id>.json)."),
    workers: int = workers_option("batches"),
    ray_address: Optional[str] = ray_address_option(),
):
    """Find every sample's circuit (EAP-IG) and write scores, circuits and faithfulness to OUT."""
    from cud.circuits.pipeline import find_circuits
    from cud.data import load_qa
    from cud.data.prepare import load_samples

    to_ray = distributed(workers, ray_address)  # refused before any work
    settings = settings_from(CircuitSettings, method=method, steps=steps, metric=metric,
                             ablation=ablation, draws=draws, reference=reference,
                             convention=convention,
                             selection=selection, n_edges=n_edges, threshold=threshold,
                             faithfulness=faithful, batch_size=batch_size, seed=seed)
    folder = out_folder(out, inputs={"--data": data, "--reference": reference})
    text = text_settings(prefix_tokens, max_tokens)
    samples = load_samples(data, split=split, limit=limit, text=text)
    ref = load_qa(reference, text=text) if reference else None
    say_text_cuts(samples + (ref or []), model)
    with progress_bars() as bar:
        if to_ray:
            from cud.runtime.distributed import find_circuits_distributed
            run = find_circuits_distributed(model, samples, folder, settings, workers=workers,
                                            address=ray_address, device=device, dtype=dtype,
                                            reference=ref, export_json=export_json,
                                            progress=bar)
        else:
            lm = load(model, device, dtype)
            run = find_circuits(lm, samples, folder, settings, reference=ref,
                                export_json=export_json, progress=bar)
    _summary(run, settings)
    print(run.root)


def _summary(run, settings: CircuitSettings) -> None:
    from rich.table import Table

    t = run.table
    table = Table(title=f"circuits: {len(t)} samples ({run.n_computed} computed, "
                        f"{run.n_skipped} already done) in {run.seconds:.1f} s",
                  title_justify="left")
    table.add_column("per sample")
    for col in ("min", "q1", "median", "q3", "max"):
        table.add_column(col, justify="right")
    columns = [("edges in circuit", "circuit_edges"), ("faithfulness", "faithfulness"),
               ("answer tokens", "n_answer_tokens"), ("clean answer log-prob", "clean_logprob"),
               ("sum |edge score|", "score_abs_sum")]
    for label, col in columns:
        if col not in t or t[col].isna().all():
            continue
        q = t[col].quantile([0, 0.25, 0.5, 0.75, 1.0])
        table.add_row(label, *(f"{v:.3g}" for v in q))
    console.print(table)
    if run.n_computed:
        console.print(f"{run.seconds / max(run.n_computed, 1):.2f} s per computed sample; "
                      f"method {settings.method}, metric {settings.metric}, ablation "
                      f"{settings.ablation} ({settings.draws} draw(s)), selection "
                      f"{settings.selection}")
    console.print(f"results in {run.root} (samples.parquet, shards/, edges.txt, manifest.json)")
    if run.n_other:
        console.print(f"{run.root} holds the circuits of these {len(t)} samples (ids.json); "
                      f"{run.n_other} circuits of other samples, from earlier runs into it, "
                      f"are kept for reuse but not read by `cud anchors`, `cud score` or "
                      f"`cud validate`")
