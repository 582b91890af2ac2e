"""Per-sample circuits of a whole QA set, written to a :class:`~cud.runtime.store.CircuitStore`
batch by batch: attribution, selection and faithfulness for every sample, resumable.

Batches are formed from the *whole* set (similar lengths together) before finished samples are
skipped, so a resumed run computes exactly the batches an uninterrupted run would have computed.
On a GPU out-of-memory error a batch is split in halves and the batch size lowered for the rest
of the run instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Sequence

import pandas as pd
import torch

from cud.circuits.attribution import (AttributionSettings, attribute,
                                     check_method_and_baseline)
from cud.circuits.baseline_activations import BASELINES, BaselineActivations, make_baseline
from cud.circuits.export import write_circuit_json
from cud.circuits.faithfulness import faithfulness
from cud.circuits.runner import ResidualRunner
from cud.circuits.selection import SelectionSettings, select
from cud.data.encoding import Batch, EncodedSample, batches, collate, encode_samples
from cud.data.samples import QASample
from cud.errors import ConfigError, NumericalError
from cud.models.loading import LoadedModel
from cud.runtime.store import CircuitStore, text_hash

OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                    torch.cuda.OutOfMemoryError})


#: Bumped whenever a code change alters the scores of the same settings, so a folder of older
#: scores is refused instead of being mixed with new ones (2: kl from log-probabilities; 3: the
#: heads' gradients from one shared stream and the alpha = 1 pass as the clean run, which round
#: differently).
SCORES_VERSION = 3


@dataclass(frozen=True)
class CircuitSettings:
    """Everything that decides a sample's circuit (and so the store's settings hash)."""

    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    #: corrupt by default: the zero baseline and the default method do not go together
    #: (:func:`~cud.circuits.attribution.check_method_and_baseline`)
    baseline: str = "corrupt"
    #: data spec of the reference set of the ``mean`` baseline
    reference: str | None = None
    #: seed of the ``corrupt`` baseline
    seed: int = 0
    faithfulness: bool = True

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ConfigError(f"unknown baseline '{self.baseline}' "
                              f"(choose from {', '.join(BASELINES)})")
        if self.baseline == "mean" and not self.reference:
            raise ConfigError("the mean baseline needs a reference set (--reference DATA)")
        check_method_and_baseline(self.attribution.method, self.baseline)

    def to_dict(self) -> dict:
        return {**self.attribution.to_dict(), **self.selection.to_dict(),
                "baseline": self.baseline, "reference": self.reference, "seed": self.seed,
                "faithfulness": self.faithfulness}


def model_fingerprint(lm: LoadedModel) -> str:
    """Identifies the weights, not the path: a fine-tuned copy of a model has the same config
    but another fingerprint. Config + dtype + a few parameter sums."""
    params = list(lm.model.parameters())
    picks = [params[0], params[len(params) // 2], params[-1]]
    # summed on the CPU, so a driver on the CPU and workers on GPUs agree
    picks = [p.detach().to("cpu", torch.float64) for p in picks]
    sums = [f"{p.sum().item():.6e}/{p.abs().sum().item():.6e}" for p in picks]
    config = {k: v for k, v in lm.model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
    blob = json.dumps([config, str(lm.dtype), sums, len(params)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class CircuitRun:
    """What :func:`find_circuits` did."""

    root: Path
    table: pd.DataFrame           # per-sample rows of this run's samples, in input order
    n_computed: int
    n_skipped: int
    seconds: float
    batch_size: int               # the batch size at the end (lower after an out-of-memory)


Progress = Callable[[int, int, dict], None]


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)[:120]


def circuit_store(lm: LoadedModel, out: str | Path, settings: CircuitSettings) -> CircuitStore:
    """Open the folder ``out`` for circuits of ``settings`` on ``lm`` (created, or resumed when it
    holds results of the same settings and model; refused otherwise)."""
    store_settings = {"model": lm.name, "model_fingerprint": model_fingerprint(lm),
                      "scores_version": SCORES_VERSION, **settings.to_dict()}
    return CircuitStore.open(out, store_settings, ResidualRunner(lm.adapter).graph)


def plan_batches(lm: LoadedModel, samples: Sequence[QASample], batch_size: int
                 ) -> list[list[str]]:
    """The sample ids of each batch an uninterrupted run computes, in order. The plan depends
    only on the samples, the tokenizer and ``batch_size``, so every worker of a distributed run
    derives the same one."""
    encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    return [b.ids for b in batches(encoded, batch_size, lm.pad_token_id)]


def find_circuits(lm: LoadedModel, samples: Sequence[QASample], out: str | Path,
                  settings: CircuitSettings = CircuitSettings(), *, batch_size: int = 8,
                  reference: Sequence[QASample] | None = None, export_json: bool = False,
                  progress: Progress | None = None,
                  only_batches: Collection[int] | None = None) -> CircuitRun:
    """Circuits of every sample of ``samples`` into the folder ``out`` (created or resumed).

    ``reference``: samples of the ``mean`` baseline's reference set. ``progress(done, total,
    info)`` is called after each batch. Returns the per-sample table of these samples.

    ``only_batches``: indices into the batch plan (:func:`plan_batches`) to compute, for one
    worker of a distributed run (:mod:`cud.runtime.distributed`); the other batches are left
    alone and the folder is not finalized (the driver does it once every worker is done)."""
    start = time.perf_counter()
    runner = ResidualRunner(lm.adapter)
    store = circuit_store(lm, out, settings)

    encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    hashes = {s.id: text_hash(s.question, s.answer) for s in samples}
    plan = batches(encoded, batch_size, lm.pad_token_id)  # the uninterrupted run's batches
    if only_batches is not None:
        wanted = set(only_batches)
        plan = [b for k, b in enumerate(plan) if k in wanted]
    mine = {i for b in plan for i in b.ids}
    done = store.done(hashes) & mine
    pending = [e for e in encoded if e.id in mine and e.id not in done]
    total, n_done = len(mine), len(done)
    if progress:
        progress(n_done, total, {"skipped": n_done})

    computed = 0
    if pending:
        baseline = _baseline(lm, runner, settings, reference, batch_size)
        by_id = {e.id: e for e in pending}
        for batch in plan:
            todo = [i for i in batch.ids if i not in done]
            if not todo:
                continue
            sub = batch if len(todo) == len(batch.ids) else \
                collate([by_id[i] for i in todo], lm.pad_token_id)
            batch_size = _process(lm, runner, store, sub, [by_id[i] for i in todo], baseline,
                                  settings, hashes, batch_size, export_json)
            computed += len(todo)
            n_done += len(todo)
            if progress:
                progress(n_done, total, {"batch": len(todo)})
    if only_batches is None:
        table = store.finalize([s.id for s in samples])
    else:
        table = store.rows().set_index("id").reindex(
            [s.id for s in samples if s.id in mine]).reset_index()
    return CircuitRun(Path(out), table, computed, total - computed,
                      time.perf_counter() - start, batch_size)


def _baseline(lm: LoadedModel, runner: ResidualRunner, settings: CircuitSettings,
              reference: Sequence[QASample] | None, batch_size: int) -> BaselineActivations:
    ref_batches = None
    if settings.baseline == "mean":
        if not reference:
            raise ConfigError("the mean baseline needs reference samples (--reference DATA)")
        ref_enc = encode_samples(lm.tokenizer, reference, max_length=lm.adapter.max_positions)
        ref_batches = [b.to(lm.device) for b in batches(ref_enc, batch_size, lm.pad_token_id)]
    return make_baseline(settings.baseline, tokenizer=lm.tokenizer, runner=runner,
                         reference=ref_batches, seed=settings.seed)


def _process(lm, runner, store, batch: Batch, encoded: list[EncodedSample], baseline,
             settings: CircuitSettings, hashes: dict, batch_size: int, export_json: bool) -> int:
    """Compute and commit one batch; on out-of-memory split it. Returns the batch size to use."""
    try:
        _compute_and_write(lm, runner, store, batch, encoded, baseline, settings, hashes,
                           export_json)
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
            batch_size = _process(lm, runner, store, sub, part, baseline, settings, hashes,
                                  min(batch_size, half), export_json)
        return min(batch_size, half)


def _compute_and_write(lm, runner, store: CircuitStore, batch: Batch,
                       encoded: list[EncodedSample], baseline, settings: CircuitSettings,
                       hashes: dict, export_json: bool) -> None:
    att = attribute(runner, batch, baseline, settings.attribution)
    finite = torch.isfinite(att.edge_scores).all(dim=1)
    if not bool(finite.all()):
        bad = [i for i, ok in zip(batch.ids, finite.tolist()) if not ok]
        raise NumericalError(f"sample(s) {', '.join(bad[:5])}: non-finite edge scores "
                             f"(overflow in {lm.dtype}?); try --dtype float32. Results of "
                             f"earlier batches are kept")
    circuits = select(runner.graph, att.edge_scores, settings.selection)
    rows = [{"text_hash": hashes[e.id], "n_tokens": len(e), "n_answer_tokens": sum(e.answer_mask),
             "clean_logprob": float(lp), "circuit_edges": int(c.sum()),
             "score_abs_sum": float(s.abs().sum())}
            for e, lp, c, s in zip(encoded, att.clean_logprob, circuits, att.edge_scores)]
    if settings.faithfulness:
        f = faithfulness(runner, batch, circuits, baseline, settings.attribution.metric,
                         clean_logprob=att.clean_logprob)
        for k, row in enumerate(rows):
            row.update(faithfulness=float(f.faithfulness[k]), metric_clean=float(f.metric_clean[k]),
                       metric_circuit=float(f.metric_circuit[k]),
                       metric_baseline=float(f.metric_baseline[k]))
    if export_json:
        folder = store.root / "json"
        folder.mkdir(exist_ok=True)
        for k, sample_id in enumerate(batch.ids):
            write_circuit_json(folder / f"{_safe_name(sample_id)}.json", runner.graph,
                               att.edge_scores[k], circuits[k])
    store.write_batch(batch.ids, att.edge_scores, circuits, rows)
