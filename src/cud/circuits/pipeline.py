"""Per-sample circuits of a whole QA set, written to a :class:`~cud.circuits.store.CircuitStore`
batch by batch: attribution, selection and faithfulness for every sample, resumable.

Batches are formed from the *whole* set (similar lengths together) before finished samples are
skipped, so a resumed run computes exactly the batches an uninterrupted run would have computed.
On a GPU out-of-memory error a batch is split in halves and the batch size lowered for the rest
of the run instead of failing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection, Sequence

import pandas as pd
import torch

from cud.circuits.ablation import Ablation, make_ablation
from cud.circuits.attribution import attribute
from cud.circuits.export import json_file_name, write_circuit_json
from cud.circuits.faithfulness import faithfulness
from cud.circuits.runner import ResidualRunner
from cud.circuits.selection import select
from cud.circuits.settings import CircuitSettings
from cud.circuits.store import CircuitStore, text_hash
from cud.data.encoding import Batch, EncodedSample, batches, collate, encode_samples
from cud.data.samples import QASample
from cud.errors import ConfigError, NumericalError
from cud.models.fingerprint import model_fingerprint
from cud.models.loading import LoadedModel
from cud.prices import record_price
from cud.progress import Progress, within

OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                    torch.cuda.OutOfMemoryError})


#: Bumped whenever a code change alters the scores of the same settings, so a folder of older
#: scores is refused instead of being mixed with new ones (2: kl from log-probabilities; 3: the
#: heads' gradients from one shared stream and the alpha = 1 pass as the clean run, which round
#: differently; 4: settings renamed (ablation, draws, batch size in the hash)).
SCORES_VERSION = 4


@dataclass
class CircuitRun:
    """What :func:`find_circuits` did."""

    root: Path
    table: pd.DataFrame           # per-sample rows of this run's samples, in input order
    n_computed: int
    n_skipped: int
    seconds: float
    batch_size: int               # the batch size at the end (lower after an out-of-memory)
    n_other: int = 0              # circuits of other samples kept in the folder, not held


def _store_settings(lm: LoadedModel, settings: CircuitSettings) -> dict:
    return {"model": lm.name, "model_fingerprint": model_fingerprint(lm),
            "scores_version": SCORES_VERSION, **settings.to_dict()}


def circuit_store(lm: LoadedModel, out: str | Path, settings: CircuitSettings) -> CircuitStore:
    """Open the folder ``out`` for circuits of ``settings`` on ``lm`` (created, or resumed when it
    holds results of the same settings and model; refused otherwise)."""
    return CircuitStore.open(out, _store_settings(lm, settings), ResidualRunner(lm.adapter).graph)


def check_circuit_folder(lm: LoadedModel, out: str | Path, settings: CircuitSettings) -> None:
    """What :func:`find_circuits` would refuse (a folder of other settings, model or graph),
    found without writing anything (`cud run` checks every stage before any writes)."""
    CircuitStore.check(out, _store_settings(lm, settings), ResidualRunner(lm.adapter).graph)


def other_samples(store: CircuitStore, ids: Sequence[str]) -> int:
    """How many samples besides ``ids`` have circuits stored in the folder (kept, not held)."""
    rows = store.rows()
    return len(set(rows["id"]) - set(ids)) if not rows.empty else 0


def plan_batches(lm: LoadedModel, samples: Sequence[QASample], batch_size: int
                 ) -> list[list[str]]:
    """The sample ids of each batch an uninterrupted run computes, in order. The plan depends
    only on the samples, the tokenizer and ``batch_size``, so every worker of a distributed run
    derives the same one."""
    encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    return [b.ids for b in batches(encoded, batch_size, lm.pad_token_id)]


def find_circuits(lm: LoadedModel, samples: Sequence[QASample], out: str | Path,
                  settings: CircuitSettings = CircuitSettings(), *,
                  reference: Sequence[QASample] | None = None, export_json: bool = False,
                  progress: Progress | None = None,
                  only_batches: Collection[int] | None = None) -> CircuitRun:
    """Circuits of every sample of ``samples`` into the folder ``out`` (created or resumed).

    ``reference``: samples of the ``mean`` ablation's reference set. ``progress`` (task
    ``circuits``) is called after each batch. Returns the per-sample table of these samples.

    ``only_batches``: indices into the batch plan (:func:`plan_batches`) to compute, for one
    worker of a distributed run (:mod:`cud.runtime.distributed`); the other batches are left
    alone and the folder is not finalized (the driver does it once every worker is done)."""
    start = time.perf_counter()
    runner = ResidualRunner(lm.adapter)
    store = circuit_store(lm, out, settings)
    if only_batches is None:  # a worker of a distributed run leaves that to its driver
        store.hold([s.id for s in samples])
    batch_size = settings.batch_size
    report = within(progress, "circuits")

    encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    hashes = {s.id: text_hash(s) for s in samples}
    types = {s.id: str(s.extra.get("question_type", "")) for s in samples}
    plan = batches(encoded, batch_size, lm.pad_token_id)  # the uninterrupted run's batches
    if only_batches is not None:
        wanted = set(only_batches)
        plan = [b for k, b in enumerate(plan) if k in wanted]
    mine = {i for b in plan for i in b.ids}
    done = store.done(hashes) & mine
    pending = [e for e in encoded if e.id in mine and e.id not in done]
    total, n_done = len(mine), len(done)
    report(n_done, total, f"{n_done} already done" if n_done else "")

    computed = 0
    if pending:
        compute_start = time.perf_counter()
        ablation = _ablation(lm, runner, settings, reference)
        by_id = {e.id: e for e in pending}
        for batch in plan:
            todo = [i for i in batch.ids if i not in done]
            if not todo:
                continue
            sub = batch if len(todo) == len(batch.ids) else \
                collate([by_id[i] for i in todo], lm.pad_token_id)
            batch_size = _process(lm, runner, store, sub, [by_id[i] for i in todo], ablation,
                                  settings, hashes, batch_size, export_json, types)
            computed += len(todo)
            n_done += len(todo)
            report(n_done, total, "")
        if only_batches is None:  # the price of a circuit, kept beside the circuits
            record_price(out, "circuits", time.perf_counter() - compute_start, computed,
                         what="attribution, selection and faithfulness of each sample",
                         accumulate=True)
    if only_batches is None:
        table = store.finalize([s.id for s in samples])
    else:
        table = store.rows().set_index("id").reindex(
            [s.id for s in samples if s.id in mine]).reset_index()
    n_other = other_samples(store, [s.id for s in samples]) if only_batches is None else 0
    return CircuitRun(Path(out), table, computed, total - computed,
                      time.perf_counter() - start, batch_size, n_other)


def _ablation(lm: LoadedModel, runner: ResidualRunner, settings: CircuitSettings,
              reference: Sequence[QASample] | None) -> Ablation:
    ref_batches = None
    if settings.ablation == "mean":
        if not reference:
            raise ConfigError("the mean ablation needs reference samples (--reference DATA)")
        ref_enc = encode_samples(lm.tokenizer, reference, max_length=lm.adapter.max_positions)
        ref_batches = [b.to(lm.device) for b in batches(ref_enc, settings.batch_size,
                                                         lm.pad_token_id)]
    return make_ablation(settings.ablation, tokenizer=lm.tokenizer, runner=runner,
                         reference=ref_batches, seed=settings.seed, draws=settings.draws,
                         token_input=settings.attribution.reference)


def _process(lm, runner, store, batch: Batch, encoded: list[EncodedSample], ablation,
             settings: CircuitSettings, hashes: dict, batch_size: int, export_json: bool,
             types: dict) -> int:
    """Compute and commit one batch; on out-of-memory split it. Returns the batch size to use."""
    try:
        _compute_and_write(lm, runner, store, batch, encoded, ablation, settings, hashes,
                           export_json, types)
        return batch_size
    except OOM_ERRORS:
        if len(batch) == 1:
            raise ConfigError(f"out of memory on a single sample ({batch.ids[0]}, "
                              f"{batch.input_ids.shape[1]} tokens); use a smaller dtype or a "
                              f"bigger device") from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        for part in (encoded[:half], encoded[half:]):
            sub = collate(part, lm.pad_token_id)
            batch_size = _process(lm, runner, store, sub, part, ablation, settings, hashes,
                                  min(batch_size, half), export_json, types)
        return min(batch_size, half)


def _compute_and_write(lm, runner, store: CircuitStore, batch: Batch,
                       encoded: list[EncodedSample], ablation: Ablation,
                       settings: CircuitSettings, hashes: dict, export_json: bool,
                       types: dict) -> None:
    batch = batch.to(lm.device)
    token_input = settings.attribution.reference
    with torch.no_grad():  # once per batch: attribution and faithfulness share it
        z_base = ablation.for_batch(runner, batch, token_input=token_input)
    att = attribute(runner, batch, ablation, settings.attribution, z_base=z_base)
    finite = torch.isfinite(att.edge_scores).all(dim=1)
    if not bool(finite.all()):
        bad = [i for i, ok in zip(batch.ids, finite.tolist()) if not ok]
        raise NumericalError(f"sample(s) {', '.join(bad[:5])}: non-finite edge scores "
                             f"(overflow in {lm.dtype}?); try --dtype float32. Results of "
                             f"earlier batches are kept")
    circuits = select(runner.graph, att.edge_scores, settings.selector)
    rows = [{"text_hash": hashes[e.id], "question_type": types.get(e.id, ""),
             "n_tokens": len(e), "n_answer_tokens": sum(e.answer_mask),
             "clean_logprob": float(lp), "circuit_edges": int(c.sum()),
             "score_abs_sum": float(s.abs().sum())}
            for e, lp, c, s in zip(encoded, att.clean_logprob, circuits, att.edge_scores)]
    if settings.faithfulness:
        f = faithfulness(runner, batch, circuits, ablation, settings.metric,
                         clean_logprob=att.clean_logprob, z_base=z_base,
                         token_input=token_input)
        for k, row in enumerate(rows):
            row.update(faithfulness=float(f.faithfulness[k]), metric_clean=float(f.metric_clean[k]),
                       metric_circuit=float(f.metric_circuit[k]),
                       metric_baseline=float(f.metric_baseline[k]))
        for n in settings.faithfulness_sizes:
            at_n = select(runner.graph, att.edge_scores,
                          replace(settings.selector, selection="greedy", n_edges=n))
            fn = faithfulness(runner, batch, at_n, ablation, settings.metric,
                              clean_logprob=att.clean_logprob, z_base=z_base,
                              token_input=token_input)
            for k, row in enumerate(rows):
                row[f"faithfulness_{n}"] = float(fn.faithfulness[k])
    if export_json:
        folder = store.root / "json"
        folder.mkdir(exist_ok=True)
        for k, sample_id in enumerate(batch.ids):
            write_circuit_json(folder / json_file_name(sample_id), runner.graph,
                               att.edge_scores[k], circuits[k])
    store.write_batch(batch.ids, att.edge_scores, circuits, rows)
