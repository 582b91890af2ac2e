"""Ray: a local Ray of 2 workers gives the single-process results (circuits and baseline
metrics, through the library and the CLI), resumes a single-process folder, retries the shard of
a worker killed mid-shard, and surfaces a worker's CudError as itself.

Each worker of ``ray.init(num_cpus=2)`` runs torch on 1 thread; some CPU reductions round
differently with another thread count, so the single-process references run on 1 thread too
(:func:`one_thread`) and the comparisons are bit for bit."""

from __future__ import annotations

from dataclasses import replace

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cud.circuits import CircuitSettings, find_circuits
from cud.cli import app
from cud.data import load_qa
from cud.difficulty.baselines import BaselineSettings, baseline_metrics
from cud.errors import NumericalError
from cud.models import load_model, tiny_model
from cud.circuits.store import load_circuits
from cud.runtime.distributed import (baseline_metrics_distributed, find_circuits_distributed,
                                     split_shards)

ray = pytest.importorskip("ray")

SETTINGS = CircuitSettings(steps=2, n_edges=10)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def samples():
    return load_qa("builtin:6")


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def same_circuits(a: Path, b: Path) -> None:
    x, y = load_circuits(a), load_circuits(b)
    assert x.ids == y.ids
    assert torch.equal(x.edge_scores, y.edge_scores) and torch.equal(x.circuits, y.circuits)
    assert x.table.equals(y.table)
    assert (a / "samples.csv").read_bytes() == (b / "samples.csv").read_bytes()


def test_split_shards_is_contiguous_and_balanced():
    assert split_shards(range(7), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_shards([4, 9], 5) == [[4], [9]]
    assert split_shards([], 2) == []
    groups = split_shards(range(100), 8)
    assert sum(groups, []) == list(range(100))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_cli_two_workers_equal_one_process(model_dir, tmp_path):
    args = ["circuits", "--model", str(model_dir), "--data", "builtin:6", "--steps", "2",
            "--n-edges", "10", "--batch-size", "2"]
    with one_thread():
        one = CliRunner().invoke(app, args + ["--out", str(tmp_path / "one")])
    two = CliRunner().invoke(app, args + ["--out", str(tmp_path / "two"), "--workers", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    assert "6 computed" in two.output
    same_circuits(tmp_path / "one", tmp_path / "two")


def test_ray_resumes_a_single_process_folder(model_dir, samples, tmp_path):
    lm = load_model(str(model_dir))
    lm.name = str(model_dir)
    calls = []

    def stop_after_one_batch(task, done, total=None, info=''):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with one_thread():
        full = find_circuits(lm, samples, tmp_path / "full", replace(SETTINGS, batch_size=2))
        with pytest.raises(KeyboardInterrupt):
            find_circuits(lm, samples, tmp_path / "cut", replace(SETTINGS, batch_size=2),
                          progress=stop_after_one_batch)
    run = find_circuits_distributed(str(model_dir), samples, tmp_path / "cut",
                                    replace(SETTINGS, batch_size=2), workers=2)
    assert (run.n_skipped, run.n_computed) == (2, 4)
    assert run.table.equals(full.table)
    same_circuits(tmp_path / "full", tmp_path / "cut")


def _shard_workers() -> list[int]:
    """Pids of Ray worker processes running a circuits shard right now."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::cud-circuits-shard"):
            pids.append(int(entry.name))
    return pids


def test_a_killed_worker_is_retried_and_results_are_identical(model_dir, samples, tmp_path):
    with one_thread():
        ref = find_circuits(load_model(str(model_dir)), samples, tmp_path / "one",
                            replace(SETTINGS, batch_size=1))
    out = tmp_path / "ray"
    result: dict = {}

    def run():
        try:
            result["run"] = find_circuits_distributed(str(model_dir), samples, out,
                                                      replace(SETTINGS, batch_size=1),
                                                      workers=2)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    killed = None
    while killed is None:
        assert thread.is_alive(), result
        assert time.monotonic() < deadline, "no shard committed a batch in 300 s"
        committed = list((out / "shards").glob("rows-*.parquet")) if out.is_dir() else []
        workers = _shard_workers()
        if committed and workers:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
            n_at_kill = len(committed)
        time.sleep(0.02)
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert n_at_kill < len(samples)  # the kill landed mid-run
    assert result["run"].n_computed == len(samples)
    assert result["run"].table.equals(ref.table)
    same_circuits(tmp_path / "one", out)


def test_baselines_two_workers_equal_one_process(model_dir, samples, tmp_path):
    options = BaselineSettings(mrd_k=3, mrd_sigma=1e-3, seed=5, batch_size=2)
    with one_thread():
        one = baseline_metrics(load_model(str(model_dir)), samples, options)
    two = baseline_metrics_distributed(str(model_dir), samples, options, work_dir=tmp_path / "w",
                                       workers=2)
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert len(list((tmp_path / "w").glob("shard-*"))) == 2
    again = baseline_metrics_distributed(str(model_dir), samples, options,
                                         work_dir=tmp_path / "w", workers=2)  # from caches
    pd.testing.assert_frame_equal(one, again, check_exact=True)


def test_cli_baselines_with_workers(model_dir, tmp_path):
    args = ["baselines", "--model", str(model_dir), "--data", "builtin:4", "--metrics",
            "loss,min_k_prob,mrd,random", "--mrd-k", "2", "--mrd-sigma", "1e-3"]
    with one_thread():
        one = CliRunner().invoke(app, args + ["--out", str(tmp_path / "one")])
    two = CliRunner().invoke(app, args + ["--out", str(tmp_path / "two"), "--workers", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / "baselines.parquet"),
                                  pd.read_parquet(tmp_path / "two" / "baselines.parquet"),
                                  check_exact=True)


def test_a_workers_error_is_raised_as_itself_and_earlier_batches_stay(tmp_path):
    lm = tiny_model("llama", seed=0)
    hot = lm.tokenizer.convert_tokens_to_ids("~")
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[hot] = 1e5  # overflows float16
    lm.model.save_pretrained(tmp_path / "hot")
    lm.tokenizer.save_pretrained(tmp_path / "hot")
    rows = [{"id": f"q{i}", "question": f"What is item {i}?", "answer": f"It is {i}."}
            for i in range(3)]
    rows.append({"id": "tilde", "question": "Where is ~ ?", "answer": "It is at ~ , far away."})
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(NumericalError, match="sample.s. tilde: non-finite edge scores"):
        find_circuits_distributed(str(tmp_path / "hot"), load_qa(tmp_path / "a.jsonl"),
                                  tmp_path / "out", replace(SETTINGS, batch_size=1), workers=2,
                                  dtype="float16")
    kept = load_circuits(tmp_path / "out")
    assert "tilde" not in kept.ids and len(kept) >= 1
