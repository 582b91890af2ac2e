"""Benchmark: the cost of an unlearning step and of MRD, as ratios to plain passes.

1. One optimizer step of each unlearning method versus a bare training step on the same forget
   batch (Hugging Face forward with ``labels``, backward, AdamW). Methods with a retain term also
   run the retain batch; methods with a reference model also run it, so ratios above 1 are the
   price of those terms, and the packed answer-only read-out pulls the other way.
2. MRD with K perturbations versus K plain forward passes over the same samples.

Usage: python bench/unlearning.py [--model smollm2] [--samples 32] [--batch-size 8] [--steps 4]
       [--mrd-k 5] [--threads 2]
Prints seconds and ratios; never asserted in tests.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def timed_steps(fn, steps: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--mrd-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cud.data import collate, encode_samples, load_qa
    from cud.difficulty.baselines import mrd
    from cud.models import load_model
    from cud.data.prepare import split_forget_retain
    from cud.unlearning import METHODS, hyperparameters, make_method

    t = time.perf_counter()
    lm = load_model(args.model) if args.model != "tiny" else \
        __import__("cud.models.tiny", fromlist=["tiny_model"]).tiny_model("llama")
    print(f"model {lm.name}: loaded in {time.perf_counter() - t:.1f} s, "
          f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f}M parameters, "
          f"{torch.get_num_threads()} threads")
    samples = load_qa(f"builtin:{args.samples * 2}")
    forget, retain = split_forget_retain(samples, 0.5)
    enc_f = encode_samples(lm.tokenizer, forget)[:args.batch_size]
    enc_r = encode_samples(lm.tokenizer, retain)[:args.batch_size]
    f_batch = collate(enc_f, lm.pad_token_id)
    r_batch = collate(enc_r, lm.pad_token_id)
    print(f"batch: {len(f_batch)} forget samples, {f_batch.input_ids.shape[1]} tokens "
          f"(+ {len(r_batch)} retain samples where a method uses them)")

    def make_step(net, loss_fn, params):
        opt = torch.optim.AdamW(params, lr=1e-7)

        def step():
            net.train()
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    net = copy.deepcopy(lm.model)
    labels = f_batch.input_ids.masked_fill(~f_batch.answer_mask, -100)
    bare = timed_steps(make_step(net, lambda: net(input_ids=f_batch.input_ids,
                                                  attention_mask=f_batch.attention_mask.long(),
                                                  labels=labels).loss,
                                 list(net.parameters())), args.steps)
    del net
    rows = [("bare step (HF labels loss)", bare)]
    for name in METHODS:
        hyper, _ = hyperparameters(name, "quick")
        method = make_method(name, **hyper)
        net = copy.deepcopy(lm.model)
        reference = copy.deepcopy(lm.model).eval() if method.needs_reference else None
        method.setup(net, reference)
        params = method.trainable_parameters(net)
        for p in net.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        retain_batch = r_batch if method.uses_retain else None
        rows.append((name, timed_steps(
            make_step(net, lambda: method.loss(net, f_batch, retain_batch)[0], params),
            args.steps)))
        del net, reference
    print("\nunlearning step time (median of %d steps)" % args.steps)
    print(f"{'step':<28}{'seconds':>10}{'x bare':>10}")
    for name, secs in rows:
        print(f"{name:<28}{secs:>10.3f}{secs / bare:>10.2f}")

    # MRD versus K plain forward passes over the same samples
    mrd_samples = forget[:args.samples]
    encoded = encode_samples(lm.tokenizer, mrd_samples)
    from cud.data import batches
    batch_list = batches(encoded, 16, lm.pad_token_id)

    @torch.no_grad()
    def plain_passes():
        for _ in range(args.mrd_k):
            for b in batch_list:
                lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask.long())

    lm.model.eval()
    plain_passes()  # warm-up
    t = time.perf_counter()
    plain_passes()
    plain = time.perf_counter() - t
    t = time.perf_counter()
    mrd(lm, mrd_samples, k=args.mrd_k, sigma=1e-5, batch_size=16)
    cost = time.perf_counter() - t
    print(f"\nMRD over {len(mrd_samples)} samples, K = {args.mrd_k}")
    print(f"{'K plain forward passes':<28}{plain:>10.2f} s")
    print(f"{'MRD (K perturbations)':<28}{cost:>10.2f} s{cost / plain:>10.2f} x")
    print(f"per draw: {cost / args.mrd_k:.2f} s (noise + forward), "
          f"plain pass {plain / args.mrd_k:.2f} s")


if __name__ == "__main__":
    main()
