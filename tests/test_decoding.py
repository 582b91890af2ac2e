"""Cached greedy decoding and prompt-shared teacher-forced scoring equal the plain computations
they replace, on every tiny family: ``generate`` without a cache trick of ours, and a full
forward pass of each sequence alone."""

import numpy as np
import pandas as pd
import pytest
import torch

from cud.data import QASample, encode_samples, load_qa
from cud.models.decoding import greedy_decode
from cud.models.tiny import FAMILIES, tiny_model
from cud.models.variants import answer_token_scores
from cud.unlearning.outcomes import evaluate_outcomes, greedy_answers


def _prompts(lm, samples):
    enc = encode_samples(lm.tokenizer, samples)
    return [e.input_ids[:e.answer_mask.index(True)] for e in enc]


def _generate(lm, prompts, n):
    """``generate`` on left-padded prompts, n new tokens, no end token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), lm.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                            do_sample=False, num_beams=1, pad_token_id=lm.pad_token_id,
                            eos_token_id=None, temperature=None, top_p=None, top_k=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_equals_generate(family):
    lm = tiny_model(family, seed=3)
    prompts = _prompts(lm, load_qa("builtin:6"))   # prompts of several lengths: left padding
    assert len({len(p) for p in prompts}) > 1
    ref = _generate(lm, prompts, 10)
    got = greedy_decode(lm.model, prompts, [10] * len(prompts), pad_id=lm.pad_token_id,
                        eos_ids=set())
    assert got == ref
    # own budgets: each row is the same tokens cut at its budget, rows dropped mid-batch
    budgets = [3, 10, 1, 7, 10, 0]
    got = greedy_decode(lm.model, prompts, budgets, pad_id=lm.pad_token_id, eos_ids=set())
    assert got == [r[:b] for r, b in zip(ref, budgets)]


def test_greedy_decode_stops_each_row_at_its_end_token():
    lm = tiny_model("llama", seed=3)
    prompts = _prompts(lm, load_qa("builtin:6"))
    ref = _generate(lm, prompts, 12)
    eos = ref[1][4]                       # a token row 1 produces at its fifth step
    got = greedy_decode(lm.model, prompts, [12] * len(prompts), pad_id=lm.pad_token_id,
                        eos_ids={eos})
    expected = [r[:r.index(eos)] if eos in r else r for r in ref]
    assert got == expected
    assert len(got[1]) <= 4


class _NoCache(torch.nn.Module):
    """A model whose forward takes no cache: decoded by full reruns."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None, **_):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_models_without_a_cache_decode_the_same_tokens():
    lm = tiny_model("gpt2", seed=3)
    prompt = _prompts(lm, load_qa("builtin:1"))
    cached = greedy_decode(lm.model, prompt, [9], pad_id=lm.pad_token_id, eos_ids=set())
    plain = greedy_decode(_NoCache(lm.model), prompt, [9], pad_id=lm.pad_token_id, eos_ids=set())
    assert cached == plain and len(plain[0]) == 9


def _variants(samples):
    out = []
    for s in samples:   # answers of several lengths to one question, a one-token one among them
        for j, answer in enumerate([s.answer, "x", "not this one at all", s.answer + " too"]):
            out.append(QASample(id=f"{s.id}/{j}", question=s.question, answer=answer))
    return out


def _alone(model, e):
    """Log p of each answer token and argmax hits, from one full pass of the sequence alone."""
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    pos = [t - 1 for t, a in enumerate(e.answer_mask) if a]
    targets = [e.input_ids[t + 1] for t in pos]
    return (np.array([float(logp[t, y]) for t, y in zip(pos, targets)]),
            np.array([int(logp[t].argmax()) == y for t, y in zip(pos, targets)]))


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_shared_scores_equal_one_pass_per_sequence(family):
    lm = tiny_model(family, seed=5)
    variants = _variants(load_qa("builtin:5"))
    encoded = encode_samples(lm.tokenizer, variants)
    scores = answer_token_scores(lm.model, encoded, pad_token_id=lm.pad_token_id, batch_size=6)
    assert len(scores) == len(encoded)
    for e, sc in zip(encoded, scores):
        logp, hits = _alone(lm.model, e)
        assert len(sc.logprobs) == sum(e.answer_mask)
        np.testing.assert_allclose(sc.logprobs, logp, atol=2e-5)
        assert (sc.correct == hits).all()


def test_prompt_shared_scores_without_a_cache():
    lm = tiny_model("gpt2", seed=5)
    encoded = encode_samples(lm.tokenizer, _variants(load_qa("builtin:3")))
    shared = answer_token_scores(lm.model, encoded, pad_token_id=lm.pad_token_id, batch_size=4)
    plain = answer_token_scores(_NoCache(lm.model), encoded, pad_token_id=lm.pad_token_id,
                                batch_size=4)
    for a, b in zip(shared, plain):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)


def test_greedy_answers_do_not_depend_on_batch_mates():
    lm = tiny_model("llama", seed=2)
    samples = load_qa("builtin:8")
    together = greedy_answers(lm, samples, batch_size=8, budget=1.0)
    for s in samples[::3]:
        assert greedy_answers(lm, [s], batch_size=1, budget=1.0)[s.id] == together[s.id]


def test_evaluation_reads_one_sample_the_same_alone_or_in_a_batch():
    lm = tiny_model("qwen3", seed=2)
    samples = load_qa("builtin:6")
    for s in samples:
        s.extra["perturbed_answer"] = ["one", "two words"]
    together = evaluate_outcomes(lm, samples, batch_size=4)
    alone = evaluate_outcomes(lm, samples[2:3], batch_size=1)
    row = together.loc[samples[2].id]
    for m in ("nll", "exact_mem", "extraction_strength", "truth_ratio", "rougeL_recall"):
        assert row[m] == pytest.approx(alone.iloc[0][m], abs=1e-4), m


def test_bf16_evaluation_moves_numbers_a_little_and_reads_current_weights():
    from cud.models.precision import matmul_precision
    lm = tiny_model("llama", seed=4)
    samples = load_qa("builtin:6")
    fp32 = evaluate_outcomes(lm, samples, metrics=("nll", "exact_mem"), batch_size=4)
    bf16 = evaluate_outcomes(lm, samples, metrics=("nll", "exact_mem"), batch_size=4, bf16=True)
    moved = (bf16["nll"] - fp32["nll"]).abs()
    assert moved.max() < 0.05 and moved.max() > 0     # bf16 products were used, and stay close
    # inside an outer bf16 block (training's), the weight cast once per evaluation is dropped at
    # its end: the next evaluation reads the weights as they are now, not a stale bf16 copy
    with matmul_precision("cpu", True):
        evaluate_outcomes(lm, samples, metrics=("nll",), batch_size=4, bf16=True)
        with torch.no_grad():
            for p in lm.model.parameters():
                p.mul_(0.5)
        after = evaluate_outcomes(lm, samples, metrics=("nll",), batch_size=4, bf16=True)
    fresh = evaluate_outcomes(lm, samples, metrics=("nll",), batch_size=4, bf16=True)
    np.testing.assert_allclose(after["nll"], fresh["nll"], atol=1e-6)
    assert (after["nll"] - bf16["nll"]).abs().max() > 0.01


def test_an_unlearning_folder_keeps_one_evaluation_precision(tmp_path):
    from cud.data import fictitious_authors
    from cud.errors import CudError
    from cud.unlearning.folder import UnlearningSettings, unlearn_to_folder
    samples = fictitious_authors(8, seed=0)
    forget, retain = samples[:4], samples[4:]
    settings = UnlearningSettings(methods=("ga",), max_steps=1, batch_size=2, utility=False)
    lm = tiny_model("llama", seed=0)
    unlearn_to_folder(lm, forget, retain, tmp_path, settings)
    before = pd.read_parquet(tmp_path / "before.parquet")
    with pytest.raises(CudError, match="eval_bf16"):
        unlearn_to_folder(lm, forget, retain, tmp_path,
                          UnlearningSettings(methods=("npo",), max_steps=1, batch_size=2,
                                             utility=False, eval_bf16=True))
    assert pd.read_parquet(tmp_path / "before.parquet").equals(before)
    assert not (tmp_path / "npo").exists()


def test_teacher_forced_only_folder_keeps_every_forgetting_number_and_decodes_nothing(
        tmp_path, monkeypatch):
    """``answers = False``: the outcomes a sweep needs (NLL, probability, exact memorisation,
    extraction strength, before / after / delta, forgotten or not) equal a full evaluation's to
    the last digit, no greedy answer is decoded and no truth ratio is made, and the folder
    refuses a later run that asks for them (its 'before' table lacks them)."""
    from cud.data import fictitious_authors
    from cud.errors import CudError
    from cud.unlearning import outcomes
    from cud.unlearning.folder import UnlearningSettings, unlearn_to_folder
    samples = fictitious_authors(8, seed=0)
    forget, retain = samples[:4], samples[4:]
    common = dict(methods=("graddiff",), max_steps=2, batch_size=2, utility=False)
    full = unlearn_to_folder(tiny_model("llama", seed=0), forget, retain, tmp_path / "full",
                             UnlearningSettings(**common))

    def refuse(*args, **kwargs):
        raise AssertionError("a teacher-forced-only evaluation decoded greedy answers")
    monkeypatch.setattr(outcomes, "greedy_answers", refuse)
    quick = unlearn_to_folder(tiny_model("llama", seed=0), forget, retain, tmp_path / "tf",
                              UnlearningSettings(**common, answers=False))
    a = pd.read_parquet(tmp_path / "full" / "graddiff" / "outcomes.parquet")
    b = pd.read_parquet(tmp_path / "tf" / "graddiff" / "outcomes.parquet")
    assert not [c for c in b.columns if c.startswith(("rougeL", "truth_ratio"))]
    assert {"rougeL_recall_after", "truth_ratio_after"} <= set(a.columns)
    assert len(b.columns) > 8
    pd.testing.assert_frame_equal(a[b.columns], b)
    assert full.summary["forgotten"].equals(quick.summary["forgotten"])
    with pytest.raises(CudError, match="answers"):
        unlearn_to_folder(tiny_model("llama", seed=0), forget, retain, tmp_path / "tf",
                          UnlearningSettings(**{**common, "methods": ("npo",)}))
    assert not (tmp_path / "tf" / "npo").exists()
