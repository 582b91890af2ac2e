"""Benchmark: the default run's fine-tune (`[finetune]` of `cud run`) against shorter or faster
recipes, each trained from scratch in the same run on the same taught set.

For every recipe (epochs, rate, bf16 products) prints the training seconds, the ratio against
the default recipe measured first, and the memorisation the run then builds on: the mean exact
memorisation (share of answer tokens that are the greedy next token) and the share of samples
fully memorised (every answer token). A recipe is a candidate default only where memorisation
stays at the default's level or above.

Usage: python bench/finetune.py [--model smollm2] [--data builtin] [--threads 2]
       [--recipe EPOCHS:LR[:bf16]] ...   (default: the grid below)
Never asserted in tests.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

import torch

from cud.data.prepare import load_run_data
from cud.unlearning.finetune import FinetuneSettings, finetune

GRID = ("6:3e-4", "4:3e-4", "4:5e-4", "3:6e-4", "6:3e-4:bf16", "4:5e-4:bf16")


def recipe(text: str, base: FinetuneSettings) -> FinetuneSettings:
    parts = text.split(":")
    return replace(base, epochs=float(parts[0]), lr=float(parts[1]),
                   bf16=len(parts) > 2 and parts[2] == "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", action="append", default=None,
                    help="EPOCHS:LR[:bf16]; the first is the baseline (default: %s)" % ", ".join(GRID))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_run_data(args.data)
    base = FinetuneSettings()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for text in args.recipe or GRID:
            settings = replace(recipe(text, base), cache_dir=cache)
            result = finetune(args.model, data.taught, settings, force=True, keep_model=False)
            after = result.report["after"]
            rows.append((text, result.report["train_seconds"], result.report["steps"],
                         after["exact_mem"], after["fully_memorised"], after["nll"]))
            print(f"{text:>14}: {rows[-1][1]:7.1f} s  {rows[-1][2]} steps  exact_mem "
                  f"{after['exact_mem']:.3f}  fully {after['fully_memorised']:.3f}  "
                  f"nll {after['nll']:.3f}", flush=True)
    base_seconds = rows[0][1]
    print(f"\n{len(data.taught)} taught samples; threads {args.threads}; baseline {rows[0][0]}")
    print(f"{'recipe':>14} {'seconds':>8} {'ratio':>6} {'exact_mem':>9} {'fully':>6} {'nll':>6}")
    for text, seconds, _, exact, fully, nll in rows:
        print(f"{text:>14} {seconds:8.1f} {base_seconds / seconds:5.2f}x {exact:9.3f} "
              f"{fully:6.3f} {nll:6.3f}")


if __name__ == "__main__":
    main()
