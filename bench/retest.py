"""Benchmark: the second measurement of the circuits (`cud run`'s ``circuits-retest/``), with
the faithfulness passes it used to make (the circuit's own and one per size of
``faithfulness_sizes``) against without them (:func:`cud.workflow.retest_settings`), in one run
on the same samples, each into a fresh folder.

Prints seconds and the ratio, and checks that the edge scores and circuits, all the retest
reads, are identical.

Usage: python bench/retest.py [--model smollm2 | a fine-tuned folder] [--data builtin]
       [--limit N] [--threads 2]
Never asserted in tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from cud.circuits.pipeline import find_circuits
from cud.circuits.settings import CircuitSettings
from cud.circuits.store import load_circuits
from cud.data.prepare import load_run_data
from cud.models import load_model
from cud.workflow import retest_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    samples = load_run_data(args.data).forget[:args.limit]
    new = retest_settings(CircuitSettings())
    old = replace(CircuitSettings(), seed=new.seed)   # before: every faithfulness pass
    seconds, data = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in (("old", old), ("new", new)):
            began = time.perf_counter()
            find_circuits(lm, samples, Path(tmp) / name, settings)
            seconds[name] = time.perf_counter() - began
            data[name] = load_circuits(Path(tmp) / name, ids=[s.id for s in samples])
    same_scores = torch.equal(data["old"].edge_scores, data["new"].edge_scores)
    same_circuits = torch.equal(data["old"].circuits, data["new"].circuits)
    print(f"model {lm.name}, {len(samples)} samples of {args.data}, threads "
          f"{torch.get_num_threads()}")
    print(f"retest with faithfulness {old.faithfulness_sizes}: {seconds['old']:.1f} s; without: "
          f"{seconds['new']:.1f} s; ratio {seconds['old'] / seconds['new']:.2f}x")
    print(f"edge scores identical: {same_scores}; circuits identical: {same_circuits}")


if __name__ == "__main__":
    main()
