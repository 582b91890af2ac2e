"""Distributed execution on Ray: circuit scoring and baseline metrics sharded over processes,
GPUs and machines, with results identical to a single process.

How it works (circuits)::

    driver: load the model on the CPU ─> plan the batches (the single-process plan) ─> open the
            store ─> pending batches ─> contiguous shards ─> one Ray task per shard ─> wait,
            report progress from the store ─> finalize samples.parquet
    task:   load the model (same spec and dtype; a GPU when the cluster has one) ─> the same
            :func:`~cud.circuits.pipeline.find_circuits`, restricted to the shard's batches,
            committing each batch into the same store folder

Every task computes exactly the batches a single process would have computed, with the same
code, so the scores are the same; the store keys a shard file by its batch's sample ids, so
tasks never collide and a recomputed batch overwrites itself. A worker that dies (killed, out of
memory, lost node) has its task retried by Ray (``max_retries``); the retry skips the batches
its first attempt committed, so at most the batch in flight is recomputed. An error a user can
act on (bad data, NaN scores, another run's folder) stops the run with that error; what was
committed stays.

On a cluster (``address``): every node needs cud and the model (same path), and the output
folder must be on storage every node shares (NFS, a mounted bucket): workers write their
batches straight into it.

Ray is an optional extra (``pip install 'cud[ray]'``); nothing here imports it before it is
needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch

from cud.circuits.pipeline import (CircuitRun, circuit_store, find_circuits, other_samples,
                                   plan_batches)
from cud.circuits.settings import CircuitSettings
from cud.data.samples import QASample
from cud.errors import ConfigError, CudError, ModelError
from cud.models.loading import LoadedModel, load_model, pick_dtype
from cud.progress import Progress, within
from cud.runtime.memory import retain_freed_memory
from cud.circuits.store import text_hash

#: how often the driver looks at the store to report progress, seconds
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class ModelRef:
    """How a worker loads the model: ``name`` is the spec as the user wrote it (it names the
    model in stored settings and caches, so a distributed run and a single-process run of the
    same command share results); ``path`` is what is loaded (absolute when it is a path);
    ``device`` is ``cpu`` or ``cuda`` (the GPU Ray gave the task); ``dtype`` is resolved."""

    name: str
    path: str
    device: str
    dtype: torch.dtype

    def load(self, device: str | None = None) -> LoadedModel:
        lm = load_model(self.path, device=device or self.device, dtype=self.dtype)
        return dataclasses.replace(lm, name=self.name)


def model_ref(spec: str, device: str | None, dtype: str | torch.dtype | None, *,
              gpus: bool) -> ModelRef:
    """Resolve ``spec``/``device``/``dtype`` once, on the driver, as every worker will use them.
    ``gpus``: the Ray cluster has GPUs. ``device`` None means a GPU when there is one."""
    if device is None:
        kind = "cuda" if gpus else "cpu"
    else:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ModelError(f"unknown device '{device}'") from None
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"--device {device}: distributed runs use cpu or cuda")
        if kind == "cuda" and not gpus:
            raise ConfigError(f"--device {device} asked for, but the Ray cluster has no GPU")
    path = Path(spec).expanduser()
    where = str(path.resolve()) if path.exists() else spec
    return ModelRef(spec, where, kind, pick_dtype(dtype, torch.device(kind)))


def split_shards(items: Sequence[int], n_shards: int) -> list[list[int]]:
    """``items`` cut into at most ``n_shards`` contiguous groups of near-equal size (the first
    groups one longer), none empty."""
    if n_shards < 1:
        raise ValueError("n_shards must be at least 1")
    items = list(items)
    n = min(n_shards, len(items))
    if n == 0:
        return []
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for k in range(n):
        stop = start + size + (1 if k < extra else 0)
        out.append(items[start:stop])
        start = stop
    return out


@contextlib.contextmanager
def ray_session(workers: int, address: str | None = None) -> Iterator[object]:
    """The ``ray`` module, initialised: connected to ``address`` (a cluster: ``auto`` or
    ``ray://host:10001``), or a local Ray with at least ``workers`` CPUs. A Ray already
    initialised by the caller is used as it is and left running."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    try:
        import ray
    except ImportError:
        raise ConfigError("--workers and --ray-address need Ray: pip install 'cud[ray]'") from None
    if ray.is_initialized():
        yield ray
        return
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
        else:
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        where = f" at '{address}'" if address else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--ray-address: cannot start or reach Ray{where} ({first})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on: Ray itself retries for minutes."""
    host_port = address.split("://", 1)[-1]
    host, sep, port = host_port.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"--ray-address {address}: no Ray cluster reachable there "
                          f"({e.strerror or type(e).__name__})") from None


def _task_options(ray, workers: int, device: str, max_retries: int, name: str) -> dict:
    resources = ray.cluster_resources()
    options = {"max_retries": max_retries, "name": name}
    if device == "cuda":
        options.update(num_gpus=1, num_cpus=1)
    else:  # share the CPUs among the workers; each task sets torch's threads to its share
        options["num_cpus"] = max(1, int(resources.get("CPU", 1)) // workers)
    return options


def _worker_setup(threads: int | None) -> None:
    """A task's process as the CLI sets up its own: freed memory kept for reuse
    (:mod:`cud.runtime.memory`), and torch's intra-op threads: ``threads``, else the task's
    share of CPUs."""
    import ray
    retain_freed_memory()
    if threads is None:
        threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    torch.set_num_threads(max(1, threads))


def _has_gpus(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


def _wait(ray, refs: list, on_poll: Callable[[], None], what: str) -> list:
    """Results of ``refs`` (in order), calling ``on_poll`` while waiting. A worker's
    :class:`CudError` is raised as it is; a shard that lost its worker more times than Ray
    retries it becomes a :class:`ConfigError`. Other tasks are cancelled on any error."""
    from ray.exceptions import RayError, RayTaskError

    remaining = list(refs)
    try:
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=len(remaining),
                                        timeout=POLL_SECONDS)
            for ref in ready:
                ray.get(ref)  # surfaces a failed task now rather than at the end
            on_poll()
        return ray.get(refs)
    except RayTaskError as e:
        _cancel(ray, remaining)
        cause = getattr(e, "cause", None)
        if isinstance(cause, CudError):
            raise cause from None
        raise
    except RayError as e:
        _cancel(ray, remaining)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what}: a worker was lost more often than Ray retries a shard "
                          f"({type(e).__name__}: {first}); the batches committed so far are "
                          f"kept: run the command again to resume, with fewer --workers or a "
                          f"smaller --batch-size if workers ran out of memory") from None
    except BaseException:
        _cancel(ray, remaining)
        raise


def _cancel(ray, refs: list) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)


# --- circuits -----------------------------------------------------------------------------------

def _circuit_shard(model: ModelRef, samples: list[QASample], out: str,
                   settings: CircuitSettings, reference: list[QASample] | None,
                   export_json: bool,
                   batch_indices: list[int], threads: int | None) -> tuple[int, int]:
    """One Ray task: the planned batches ``batch_indices`` into the store at ``out``.
    Returns (samples computed by this attempt, batch size at the end)."""
    _worker_setup(threads)
    lm = model.load()
    run = find_circuits(lm, samples, out, settings, reference=reference,
                        export_json=export_json, only_batches=batch_indices)
    return run.n_computed, run.batch_size


def find_circuits_distributed(model: str, samples: Sequence[QASample], out: str | Path,
                              settings: CircuitSettings = CircuitSettings(), *,
                              workers: int = 2, address: str | None = None,
                              device: str | None = None, dtype: str | torch.dtype | None = None,
                              reference: Sequence[QASample] | None = None,
                              export_json: bool = False, progress: Progress | None = None,
                              max_retries: int = 3, threads: int | None = None) -> CircuitRun:
    """:func:`~cud.circuits.pipeline.find_circuits` on Ray: the pending batches of the
    single-process plan, cut into ``workers`` contiguous shards, one task each (a GPU each when
    the cluster has GPUs). ``model`` is a spec as :func:`~cud.models.load_model` takes it: every
    worker loads it; the driver loads it once on the CPU to plan. ``out`` must be on storage
    every worker shares. Same folder, same results as a single process; resumable the same way.
    ``progress`` (task ``circuits``) is called about once a second.

    ``threads``: torch threads per worker (default: its share of the CPUs). On a CPU, some
    reductions round differently with another thread count, so scores are bit-identical to a
    single process that uses as many threads as each worker, and equal to float rounding
    otherwise (see the README's "Determinism")."""
    start = time.perf_counter()
    report = within(progress, "circuits")
    samples = list(samples)
    order = [s.id for s in samples]
    hashes = {s.id: text_hash(s) for s in samples}
    root, out = Path(out), Path(out).expanduser().resolve()  # workers get the absolute path
    with ray_session(workers, address) as ray:
        ref = model_ref(model, device, dtype, gpus=_has_gpus(ray))
        lm = ref.load(device="cpu")
        store = circuit_store(lm, out, settings)
        store.hold(order)
        plan = plan_batches(lm, samples, settings.batch_size)
        del lm
        done = store.done(hashes)
        pending = [k for k, ids in enumerate(plan) if any(i not in done for i in ids)]
        n_skipped = sum(i in done for i in order)
        report(n_skipped, len(order), f"{n_skipped} already done" if n_skipped else "")
        results = []
        if pending:
            task = ray.remote(_circuit_shard).options(
                **_task_options(ray, workers, ref.device, max_retries, "cud-circuits-shard"))
            samples_ref = ray.put(samples)
            refs = [task.remote(ref, samples_ref, str(out), settings,
                                list(reference) if reference else None, export_json, shard,
                                threads)
                    for shard in split_shards(pending, workers)]

            def poll() -> None:
                if progress:
                    report(len(store.done(hashes)), len(order), f"{len(refs)} workers")

            results = _wait(ray, refs, poll, "circuits")
    table = store.finalize(order)
    final_batch = min([b for _, b in results], default=settings.batch_size)
    # counted from the store: a retried task does not report what its lost attempt committed
    n_computed = len(table) - n_skipped
    return CircuitRun(root, table, n_computed, n_skipped, time.perf_counter() - start,
                      final_batch, other_samples(store, order))


# --- baseline metrics ---------------------------------------------------------------------------

def _baseline_shard(model: ModelRef, samples: list[QASample], settings, work_dir: str,
                    threads: int | None) -> pd.DataFrame:
    """One Ray task: :func:`~cud.difficulty.baselines.baseline_metrics` of a shard's samples
    (given in plan order, so its batches are the single-process batches)."""
    from cud.difficulty.baselines import baseline_metrics

    _worker_setup(threads)
    lm = model.load()
    return baseline_metrics(lm, samples, settings, work_dir=work_dir)


def baseline_metrics_distributed(model: str, samples: Sequence[QASample], settings=None, *,
                                 work_dir: str | Path, workers: int = 2,
                                 address: str | None = None, device: str | None = None,
                                 dtype: str | torch.dtype | None = None,
                                 progress: Progress | None = None,
                                 max_retries: int = 3, threads: int | None = None
                                 ) -> pd.DataFrame:
    """:func:`~cud.difficulty.baselines.baseline_metrics` on Ray, the same table.

    ``settings``: a :class:`~cud.difficulty.baselines.BaselineSettings` (default: its defaults).
    The samples are cut along the single-process batch plan (``batch_size`` samples of similar
    length) into ``workers`` contiguous shards; a shard's samples go to its task in plan order,
    so every batch (and every MRD perturbation, seeded by draw) is the one a single process
    computes. Each shard caches its finished metrics and MRD draws under
    ``work_dir/shard-<hash of its ids>``, so a retried or rerun shard resumes. The random
    ranking is drawn on the driver over the whole set, as in one process.
    ``progress`` (task ``shards``) is called as shards finish; ``threads`` as in
    :func:`find_circuits_distributed`."""
    from cud.data.encoding import batches, encode_samples
    from cud.difficulty.baselines import BaselineSettings, random_scores

    settings = settings or BaselineSettings()
    samples = list(samples)
    ids = pd.Index([s.id for s in samples], name="id")
    computed = [m for m in settings.metrics if m != "random"]
    shard_settings = dataclasses.replace(settings, metrics=tuple(computed))
    work = Path(work_dir).expanduser().resolve()
    table = pd.DataFrame(index=ids)
    if computed:
        with ray_session(workers, address) as ray:
            ref = model_ref(model, device, dtype, gpus=_has_gpus(ray))
            lm = ref.load(device="cpu")
            encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
            plan = [b.ids for b in batches(encoded, settings.batch_size, lm.pad_token_id)]
            del lm, encoded
            by_id = {s.id: s for s in samples}
            shards = [[by_id[i] for k in group for i in plan[k]]
                      for group in split_shards(range(len(plan)), workers)]
            task = ray.remote(_baseline_shard).options(
                **_task_options(ray, workers, ref.device, max_retries, "cud-baselines-shard"))
            refs = [task.remote(ref, shard, shard_settings,
                                str(work / f"shard-{_ids_hash(s.id for s in shard)}"),
                                threads)
                    for shard in shards]
            finished: set = set()

            def poll() -> None:
                if progress:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                    finished.update(ready)
                    progress("shards", len(finished), len(refs), "")

            parts = _wait(ray, refs, poll, "baselines")
        merged = pd.concat(parts)
        for name in merged.columns:
            table[name] = merged[name].reindex(ids)
    if "random" in settings.metrics:
        table["random"] = random_scores(samples, settings.seed)
    return table


def _ids_hash(ids) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]
