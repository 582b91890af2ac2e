"""A real `cud circuits` process killed with SIGKILL mid-run and started again finishes with the
results of an uninterrupted run, byte for byte, recomputing at most the batch in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from cud.cli import app
from cud.models import tiny_model
from cud.circuits.store import load_circuits

N_SAMPLES = 6


def _args(model: Path, out: Path) -> list[str]:
    # batch size 1: six batches, so a kill after the first commit lands mid-run
    return ["circuits", "--model", str(model), "--data", f"builtin:{N_SAMPLES}", "--steps", "3",
            "--n-edges", "10", "--batch-size", "1", "--out", str(out)]


def _cud(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from cud.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(out: Path) -> dict[str, int]:
    """Committed batches: rows file name -> modification time (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("rows-*.parquet")}


def test_sigkilled_run_resumes_to_the_uninterrupted_results(tmp_path):
    model = tmp_path / "model"
    lm = tiny_model("llama", seed=0)
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    cut = tmp_path / "cut"

    proc = _cud(_args(model, cut))
    deadline = time.monotonic() + 300
    while not (cut / "shards").is_dir() or not _committed(cut):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no batch committed in 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = _committed(cut)
    assert 1 <= len(before) < N_SAMPLES  # killed mid-run
    assert not (cut / "samples.parquet").exists()

    resumed = _cud(_args(model, cut))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"{N_SAMPLES - len(before)} computed, {len(before)} already done" in err
    after = _committed(cut)
    assert all(after[name] == mtime for name, mtime in before.items())  # not recomputed
    assert len(after) == N_SAMPLES

    full = tmp_path / "full"
    assert CliRunner().invoke(app, _args(model, full)).exit_code == 0
    a, b = load_circuits(full), load_circuits(cut)
    assert a.ids == b.ids
    assert torch.equal(a.edge_scores, b.edge_scores) and torch.equal(a.circuits, b.circuits)
    assert a.table.equals(b.table)
    assert (full / "samples.csv").read_bytes() == (cut / "samples.csv").read_bytes()
