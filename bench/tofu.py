"""Benchmark: where the time of the TOFU experiment goes on this machine, stage by stage, and
what bfloat16 matrix products (autocast; float32 weights, optimiser and losses) buy.

Each stage of `cud run --preset tofu` is timed on ``--n`` TOFU samples (forget10 and the first
retain authors), once in float32 and once under bf16 autocast where the stage allows it
(attribution and MRD stay float32: see the README), and the per-sample time is projected to the
full run's counts (``--forget`` and ``--retain`` samples, the preset's epochs). Both precisions
are measured in the same run, so their ratio is comparable; a quiet machine is assumed.

Usage: python bench/tofu.py --tofu PATH [--n 32] [--threads 2] [--model smollm2]
Prints seconds per sample, the bf16 / fp32 ratio and the projection; never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tofu", required=True, help="folder of TOFU's JSON files")
    parser.add_argument("--n", type=int, default=32, help="samples timed per stage")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forget", type=int, default=400)
    parser.add_argument("--retain", type=int, default=400)
    parser.add_argument("--finetune-epochs", type=float, default=5)
    parser.add_argument("--unlearn-epochs", type=float, default=1)
    parser.add_argument("--methods", type=int, default=5)
    parser.add_argument("--mrd-k", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cud.circuits import CircuitSettings, find_circuits
    from cud.data import encode_samples
    from cud.data.prepare import load_run_data
    from cud.difficulty.baselines import gradient_norms, mrd
    from cud.models import load_model
    from cud.models.answers import answer_nll, teacher_forced_outcomes
    from cud.unlearning.loop import TrainConfig, train
    from cud.unlearning.methods import make_method
    from cud.unlearning.outcomes import greedy_answers, truth_ratios

    lm = load_model(args.model)
    data = load_run_data(f"tofu:{args.tofu}:forget10:retain90", retain_authors=20)
    forget, retain = data.forget[:args.n], data.retain[:args.n]
    enc_f = encode_samples(lm.tokenizer, forget)
    enc_r = encode_samples(lm.tokenizer, retain)
    tokens = sum(len(e) for e in enc_f) / len(enc_f)
    answer = sum(sum(e.answer_mask) for e in enc_f) / len(enc_f)
    print(f"{lm.name}, {torch.get_num_threads()} threads; {args.n} samples of TOFU forget10: "
          f"{tokens:.0f} tokens on average, {answer:.0f} of them answer\n")

    def autocast(bf16: bool):
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def finetune_steps(bf16):
        net = __import__("copy").deepcopy(lm.model)
        cfg = TrainConfig(lr=1e-5, max_steps=max(1, args.n // 8), batch_size=8, warmup=0,
                          bf16=bf16)
        train(net, lambda m, f, r: (answer_nll(m, f).mean(), {}), enc_f, None, cfg,
              pad_token_id=lm.pad_token_id)

    def graddiff_steps(bf16):
        net = __import__("copy").deepcopy(lm.model)
        method = make_method("graddiff", alpha=1.0)
        method.setup(net, None)
        cfg = TrainConfig(lr=1e-5, max_steps=max(1, args.n // 8), batch_size=8, warmup=0,
                          bf16=bf16)
        train(net, method.loss, enc_f, enc_r, cfg, pad_token_id=lm.pad_token_id)

    def in_precision(fn):
        return lambda bf16: _with(autocast(bf16), fn)

    def _with(ctx, fn):
        with ctx:
            fn()

    n_ft = (args.forget + args.retain) * args.finetune_epochs
    n_unl = args.forget * args.unlearn_epochs * args.methods
    n_eval = args.forget * (args.methods + 1)
    stages = [
        ("fine-tuning (per sample-epoch)", finetune_steps, n_ft, True),
        ("unlearning, GradDiff step (per forget sample)", graddiff_steps, n_unl, True),
        ("teacher-forced outcomes", in_precision(
            lambda: teacher_forced_outcomes(lm, forget)), n_eval, True),
        ("greedy answers (ROUGE-L)", in_precision(
            lambda: greedy_answers(lm, forget)), n_eval, True),
        ("truth ratio (1 paraphrased + 5 perturbed)", in_precision(
            lambda: truth_ratios(lm, forget)), n_eval, True),
        ("gradient norm", in_precision(lambda: gradient_norms(lm, forget)), args.forget, True),
        ("MRD, one weight draw", lambda bf16: mrd(lm, forget, k=1), args.forget * args.mrd_k,
         False),
    ]
    print(f"{'stage':<46} {'fp32 s/sample':>13} {'bf16 s/sample':>13} {'bf16/fp32':>9} "
          f"{'projected fp32 / bf16 (min)':>28}")
    total32 = total16 = 0.0
    for name, fn, count, allows_bf16 in stages:
        fn(False)  # warm-up
        t32 = seconds(lambda: fn(False)) / args.n
        t16 = seconds(lambda: fn(True)) / args.n if allows_bf16 else t32
        total32 += t32 * count
        total16 += t16 * count
        print(f"{name:<46} {t32:13.3f} {t16:13.3f} {t16 / t32:9.2f} "
              f"{t32 * count / 60:13.1f} / {t16 * count / 60:5.1f}")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        t = seconds(lambda: find_circuits(lm, forget, tmp, CircuitSettings())) / args.n
    total32 += t * args.forget
    total16 += t * args.forget
    print(f"{'circuits (eap-ig-activations, fp32)':<46} {t:13.3f} {t:13.3f} {1:9.2f} "
          f"{t * args.forget / 60:13.1f} / {t * args.forget / 60:5.1f}")
    print(f"\nprojected total: {total32 / 60:.0f} min in fp32, {total16 / 60:.0f} min with bf16 "
          f"where allowed (fine-tune {args.finetune_epochs} epochs of {args.forget + args.retain}, "
          f"{args.methods} methods x {args.unlearn_epochs} epoch(s), {args.methods + 1} "
          f"evaluations of {args.forget}, MRD K={args.mrd_k})")


if __name__ == "__main__":
    main()
