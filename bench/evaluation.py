"""Benchmark: the outcome evaluation (teacher-forced metrics, truth ratio, greedy answers) of
the forget set, old path against new, in one run on the same samples.

- old: one full teacher-forced pass per answer (the answer, then the paraphrased and every
  perturbed answer, each with its whole prompt), and ``generate`` with one budget per batch
  (``budget`` times the batch's longest answer plus 8), every row running to the batch's end;
- new, fp32: each prompt run once for all its answers (:mod:`cud.models.variants`), cached
  greedy decoding with each row stopping at its own end or budget (:mod:`cud.models.decoding`);
- new, bf16: the same under :func:`cud.models.precision.evaluation_precision`;
- teacher-forced only (``[unlearning] answers = false``): the new fp32 pass without the truth
  ratio's answers and without greedy answers, against the whole new fp32 evaluation.

Prints seconds, the ratio old / new per part and in all, and how far each new path moves the
numbers from the old: the largest absolute change of NLL and truth ratio, the share of greedy
answers that are the same text, the mean absolute change of ROUGE-L recall, and the Spearman
correlation of each metric's ranking with the old one.

Usage: python bench/evaluation.py [--model smollm2] [--data builtin] [--samples 64]
       [--batch-size 32] [--budget 1.25] [--threads 2]
Never asserted in tests.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd
import torch


def old_greedy(lm, samples, batch_size, budget):
    """The evaluation's greedy answers before the cached decoder: ``generate`` per batch of
    prompt-length-sorted samples, one budget per batch."""
    from cud.data import encode_samples
    from cud.models.decoding import eos_token_ids
    model, tok = lm.model, lm.tokenizer
    encoded = encode_samples(tok, samples)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    eos = sorted(eos_token_ids(model, tok))
    answers = {}
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        prompts = [e.input_ids[:e.answer_mask.index(True)] for e in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), lm.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = math.ceil(budget * max(sum(e.answer_mask) for e in chunk)) + 8
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 do_sample=False, num_beams=1, pad_token_id=lm.pad_token_id,
                                 eos_token_id=eos or None, temperature=None, top_p=None,
                                 top_k=None)
        for e, row in zip(chunk, out[:, width:].tolist()):
            answers[e.id] = tok.decode(row, skip_special_tokens=True).strip()
    return answers


def old_teacher_forced(lm, samples, batch_size):
    """The answers' metrics and the truth ratio before prompt sharing: full passes."""
    from cud.data.prepare import has_perturbations
    from cud.models.answers import teacher_forced_outcomes
    from cud.unlearning.outcomes import _variants
    df = teacher_forced_outcomes(lm, samples, batch_size=batch_size)
    variants, owners = [], []
    for s in samples:
        if has_perturbations(s):
            extra = _variants(s)
            variants += extra
            owners += [(s.id, j) for j in range(len(extra))]
    nll = teacher_forced_outcomes(lm, variants, batch_size=batch_size)["nll"].to_numpy()
    para, pert = {}, {}
    for (sid, j), v in zip(owners, nll):
        if j == 0:
            para[sid] = v
        else:
            pert.setdefault(sid, []).append(v)
    df["truth_ratio"] = [math.exp(para[i] - np.mean(pert[i])) if i in para else np.nan
                         for i in df.index]
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="builtin")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", type=float, default=1.25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scipy.stats import spearmanr

    from cud.data.prepare import load_run_data
    from cud.models import load_model
    from cud.models.precision import evaluation_precision
    from cud.unlearning.outcomes import greedy_answers, rouge_l_recall, _scored

    lm = load_model(args.model)
    samples = load_run_data(args.data).forget[:args.samples]
    print(f"model {lm.name}, {len(samples)} forget samples of {args.data}, batch "
          f"{args.batch_size}, budget {args.budget}, {torch.get_num_threads()} threads")
    _scored(lm, samples[:4], truth=True, answers=True, batch_size=4, progress=None, task="")

    def timed(fn):
        t = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - t

    runs = {}
    tf, t_tf = timed(lambda: old_teacher_forced(lm, samples, args.batch_size))
    greedy, t_g = timed(lambda: old_greedy(lm, samples, args.batch_size, args.budget))
    runs["old fp32"] = (tf, greedy, t_tf, t_g)
    for name, bf16 in (("new fp32", False), ("new bf16", True)):
        with evaluation_precision(lm.device, bf16):
            tf, t_tf = timed(lambda: _scored(lm, samples, truth=True, answers=True,
                                             batch_size=args.batch_size, progress=None,
                                             task=""))
            greedy, t_g = timed(lambda: greedy_answers(lm, samples, batch_size=args.batch_size,
                                                       budget=args.budget))
        runs[name] = (tf, greedy, t_tf, t_g)

    refs = {s.id: s.answer for s in samples}
    base_tf, base_greedy, base_t_tf, base_t_g = runs["old fp32"]
    base_rouge = pd.Series({i: rouge_l_recall(a, refs[i]) for i, a in base_greedy.items()})
    print(f"{'path':<10} {'tf+truth s':>10} {'ratio':>6} {'greedy s':>9} {'ratio':>6} "
          f"{'total s':>8} {'ratio':>6}  moves against old fp32")
    for name, (tf, greedy, t_tf, t_g) in runs.items():
        total, base_total = t_tf + t_g, base_t_tf + base_t_g
        line = (f"{name:<10} {t_tf:>10.1f} {base_t_tf / t_tf:>6.2f} {t_g:>9.1f} "
                f"{base_t_g / t_g:>6.2f} {total:>8.1f} {base_total / total:>6.2f}")
        if name != "old fp32":
            rouge = pd.Series({i: rouge_l_recall(a, refs[i]) for i, a in greedy.items()})
            d_nll = (tf["nll"] - base_tf["nll"]).abs().max()
            d_tr = (tf["truth_ratio"] - base_tf["truth_ratio"]).abs().max()
            same = np.mean([greedy[i] == base_greedy[i] for i in greedy])
            rho = {m: spearmanr(tf[m], base_tf[m]).statistic for m in ("nll", "truth_ratio")}
            rho["rougeL"] = spearmanr(rouge, base_rouge.reindex(rouge.index)).statistic
            line += (f"  |dNLL| max {d_nll:.1e}, |dTR| max {d_tr:.1e}, same greedy "
                     f"{same:.0%}, |dROUGE| mean {(rouge - base_rouge).abs().mean():.3f}, "
                     f"rho nll {rho['nll']:.3f} tr {rho['truth_ratio']:.3f} "
                     f"rouge {rho['rougeL']:.3f}")
        print(line, flush=True)
    tf_new, _, t_tf_new, t_g_new = runs["new fp32"]
    only, t_only = timed(lambda: _scored(lm, samples, truth=False, answers=True,
                                         batch_size=args.batch_size, progress=None, task=""))
    moved = max((only[m] - tf_new[m]).abs().max() for m in ("nll", "prob", "exact_mem"))
    print(f"{'tf only':<10} {t_only:>10.1f} {'':>6} {0.0:>9.1f} {'':>6} {t_only:>8.1f} "
          f"{(t_tf_new + t_g_new) / t_only:>6.2f}  (answers = false) against new fp32 in all; "
          f"its NLL, probability and exact memorisation move by at most {moved:.1e}",
          flush=True)


if __name__ == "__main__":
    main()
