"""Command `circuits`: per-sample circuits of a QA set, written to an output folder."""

from __future__ import annotations

from typing import Optional

import typer

from cud.cli.app import app, console, fail
from cud.cli.common import load, progress_bar
from cud.errors import CudError


@app.command()
def circuits(
    model: str = typer.Option("smollm2", help="Model: bundled short name, HF folder or .gguf."),
    data: str = typer.Option("builtin", help="QA data: builtin[:N[:SEED]], .json/.jsonl/.csv, "
                                              "or a dataset folder."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset folder."),
    out: str = typer.Option("cud-out/circuits", help="Output folder (created, or resumed)."),
    method: str = typer.Option("eap-ig-activations",
                               help="eap, eap-ig-inputs, eap-ig-activations or "
                                    "eap-ig-activations-by-layer (the reference code's schedule: "
                                    "2L+1 times the passes)."),
    steps: int = typer.Option(5, help="Integration steps of eap-ig-*."),
    baseline: str = typer.Option("corrupt", help="corrupt (question tokens replaced), zero (not "
                                                 "with eap-ig-activations) or mean (needs "
                                                 "--reference)."),
    reference: Optional[str] = typer.Option(None, help="Reference QA data of the mean baseline."),
    metric: str = typer.Option("kl", help="kl or logprob."),
    selection: str = typer.Option("greedy", help="greedy, topn or threshold."),
    n_edges: int = typer.Option(75, help="Circuit size for greedy and topn."),
    threshold: Optional[float] = typer.Option(None, help="|score| threshold for 'threshold'."),
    faithful: bool = typer.Option(True, "--faithfulness/--no-faithfulness",
                                  help="Measure each circuit's faithfulness (one more pass)."),
    batch_size: int = typer.Option(8, help="Samples per pass (lowered on GPU out-of-memory)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples."),
    seed: int = typer.Option(0, help="Seed of the corrupt baseline."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: GPU if any)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16 "
                                                   "(default: fp32 on CPU, bf16 on GPU)."),
    export_json: bool = typer.Option(False, help="Also write every circuit as EAP-IG JSON "
                                                 "(OUT/json/<id>.json)."),
    workers: int = typer.Option(1, help="Ray workers to shard the batches over (1: this "
                                        "process; needs cud[ray] otherwise)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to run on ('auto', "
                                                         "'ray://host:10001'); OUT must be on "
                                                         "storage every node shares."),
):
    """Find every sample's circuit (EAP-IG) and write scores, circuits and faithfulness to OUT."""
    from cud.circuits.attribution import AttributionSettings
    from cud.circuits.pipeline import CircuitSettings, find_circuits
    from cud.circuits.selection import SelectionSettings
    from cud.data import load_qa

    try:
        if batch_size < 1:
            fail(f"--batch-size must be at least 1, got {batch_size}")
        if workers < 1:
            fail(f"--workers must be at least 1, got {workers}")
        settings = CircuitSettings(
            attribution=AttributionSettings(method=method, steps=steps, metric=metric),
            selection=SelectionSettings(selection=selection, n_edges=n_edges,
                                        threshold=threshold),
            baseline=baseline, reference=reference, seed=seed, faithfulness=faithful)
        samples = load_qa(data, split=split, limit=limit)
        ref = load_qa(reference) if reference else None
        distributed = workers > 1 or ray_address is not None
        lm = None if distributed else load(model, device, dtype)
        with progress_bar() as bar:
            task = bar.add_task("circuits", total=len(samples), info="")

            def update(done: int, total: int, info: dict) -> None:
                note = f"{info['skipped']} already done" if "skipped" in info else \
                    f"{info['workers']} workers" if "workers" in info else ""
                bar.update(task, completed=done, total=total, info=note)

            if distributed:
                from cud.runtime.distributed import find_circuits_distributed
                run = find_circuits_distributed(
                    model, samples, out, settings, workers=workers, address=ray_address,
                    device=device, dtype=dtype, batch_size=batch_size, reference=ref,
                    export_json=export_json, progress=update)
            else:
                run = find_circuits(lm, samples, out, settings, batch_size=batch_size,
                                    reference=ref, export_json=export_json, progress=update)
    except CudError as e:
        fail(str(e))
    _summary(run, settings)
    print(run.root)


def _summary(run, settings) -> None:
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
                      f"method {settings.attribution.method}, metric {settings.attribution.metric}, "
                      f"baseline {settings.baseline}, selection {settings.selection.selection}")
    console.print(f"results in {run.root} (samples.parquet, shards/, edges.txt, manifest.json)")
