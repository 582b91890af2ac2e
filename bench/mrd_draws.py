"""Benchmark: how many MRD draws the ranking needs. Two independent runs of K draws each (seeds
0 and 1) on the same forget samples; for each k <= K, MRD from the first k draws of each run.

Prints per k: the test-retest Spearman ρ between the two runs' MRD (how reproducible the
ranking is with k draws), the ρ of run 0's MRD at k against its own MRD at K, and the seconds a
draw costs. A k whose test-retest ρ is as high as K's gives the same ranking at k/K of the cost.

Usage: python bench/mrd_draws.py [--model smollm2 | a fine-tuned folder] [--data builtin]
       [--draws 20] [--batch-size 16] [--threads 2]
Never asserted in tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cumulative_draws(lm, samples, k: int, seed: int, batch_size: int) -> tuple[np.ndarray, float]:
    """(k, n) running sums of MRD's per-sample relative change after each draw, read from the
    checkpoint MRD writes after every draw, and the seconds per draw."""
    from cud.difficulty.baselines import mrd
    sums = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "mrd.npz"

        def after_draw(_task, done, _total, _note):
            saved = np.load(ckpt)
            n_batches = sum(1 for key in saved.files if key.startswith("acc"))
            sums.append(np.concatenate([saved[f"acc{i}"] for i in range(n_batches)]))

        began = time.perf_counter()
        mrd(lm, samples, k=k, seed=seed, batch_size=batch_size, checkpoint=ckpt,
            progress=after_draw)
        seconds = (time.perf_counter() - began) / k
    return np.stack(sums), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="builtin")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scipy.stats import spearmanr

    from cud.data.prepare import load_run_data
    from cud.models import load_model

    lm = load_model(args.model)
    samples = load_run_data(args.data).forget
    runs, seconds = [], []
    for seed in (0, 1):
        sums, sec = cumulative_draws(lm, samples, args.draws, seed, args.batch_size)
        runs.append(sums)
        seconds.append(sec)
    print(f"model {lm.name}, {len(samples)} forget samples of {args.data}, {args.draws} draws "
          f"x 2 seeds, {np.mean(seconds):.2f} s per draw, {torch.get_num_threads()} threads")
    print(f"{'k':>4} {'test-retest rho':>16} {'rho vs own K':>13} {'cost vs K':>10}")
    k_all = args.draws
    full = np.minimum(np.abs(runs[0][k_all - 1] / k_all), 2)
    for k in sorted({1, 2, 3, 5, 10, 15, k_all} & set(range(1, k_all + 1))):
        a, b = (np.minimum(np.abs(r[k - 1] / k), 2) for r in runs)
        print(f"{k:>4} {spearmanr(a, b).statistic:>16.3f} {spearmanr(a, full).statistic:>13.3f} "
              f"{k / k_all:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
