"""Outcome metrics on crafted examples with known answers, truth ratio and forget quality, tables."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cud.data import QASample, encode_sample, load_qa
from cud.models.loading import LoadedModel
from cud.models.tiny import tiny_model, tiny_tokenizer
from cud.unlearning import TrainConfig
from cud.unlearning.finetune import teach
from cud.data.prepare import add_perturbed_answers
from cud.models.answers import teacher_forced_outcomes
from cud.unlearning.outcomes import (METRICS, evaluate_outcomes,
                                     forget_quality, forgetting_scores, greedy_answers,
                                     model_utility, outcome_deltas, rouge_l_recall, save_outcomes,
                                     truth_ratios)
from cud.data.general import general_knowledge
from cud.data import encode_samples


class Oracle(torch.nn.Module):
    """Predicts the true next token (logit 10 on it) except at chosen answer tokens, where it
    predicts a wrong one. ``wrong``: input_ids tuple -> set of answer-token indices to get wrong."""

    def __init__(self, vocab: int, wrong: dict):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.training = False

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None, **_):
        b, t = input_ids.shape
        nxt = torch.zeros_like(input_ids)
        nxt[:, :-1] = input_ids[:, 1:]
        for i in range(b):
            ids = tuple(input_ids[i][attention_mask[i].bool()].tolist())
            for pos in self.wrong.get(ids, ()):
                nxt[i, pos - 1] = (nxt[i, pos - 1] + 1) % self.vocab  # the token at pos is wrong
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 10.0
        if logits_to_keep is not None:
            logits = logits[logits_to_keep]
        return SimpleNamespace(logits=logits, hidden_states=None)


def oracle_lm(samples, wrong_answer_tokens):
    """An LoadedModel whose teacher-forced answer predictions are wrong exactly at the given
    answer-token indices (0 = first answer token) of each sample."""
    tok = tiny_tokenizer()
    wrong = {}
    for s in samples:
        e = encode_sample(tok, s)
        first = e.answer_mask.index(True)
        wrong[e.input_ids] = {first + j for j in wrong_answer_tokens.get(s.id, ())}
    model = Oracle(len(tok), wrong)
    return LoadedModel("oracle", model, tok, SimpleNamespace(max_positions=None))


def sample(sid, answer="abcd"):
    return QASample(id=sid, question=f"Question {sid}?", answer=answer)


def test_exact_memorisation_and_extraction_strength_on_crafted_predictions():
    # byte-level tokenizer: "abcd" is 4 answer tokens (a leading space is added: 5 tokens)
    samples = [sample("all"), sample("last"), sample("first"), sample("middle"), sample("none")]
    n = sum(encode_sample(tiny_tokenizer(), samples[0]).answer_mask)
    lm = oracle_lm(samples, {"last": [n - 1], "first": [0], "middle": [1, 2],
                             "none": list(range(n))})
    df = teacher_forced_outcomes(lm, samples, batch_size=2)
    assert df.loc["all", "exact_mem"] == 1.0 and df.loc["all", "extraction_strength"] == 1.0
    # last token wrong: the rest is never reproduced from any prefix shorter than the answer
    assert df.loc["last", "exact_mem"] == pytest.approx((n - 1) / n)
    assert df.loc["last", "extraction_strength"] == pytest.approx(0.0)
    # first token wrong: a one-token prefix suffices
    assert df.loc["first", "extraction_strength"] == pytest.approx(1 - 1 / n)
    assert df.loc["middle", "exact_mem"] == pytest.approx((n - 2) / n)
    assert df.loc["middle", "extraction_strength"] == pytest.approx(1 - 3 / n)
    assert df.loc["none", "exact_mem"] == 0.0 and df.loc["none", "extraction_strength"] == 0.0
    assert (df["n_answer_tokens"] == n).all()
    assert list(df.index) == [s.id for s in samples]


def test_nll_and_prob_are_consistent():
    lm = tiny_model("gpt2")
    df = teacher_forced_outcomes(lm, load_qa("builtin:6"))
    np.testing.assert_allclose(df["prob"], np.exp(-df["nll"]), rtol=1e-9)
    # a random model over 261 tokens is near uniform
    assert df["nll"].between(4.5, 6.5).all()


def test_rouge_l_recall_known_values():
    assert rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert rouge_l_recall("noir crime, of course", "noir crime") == pytest.approx(1.0)
    assert rouge_l_recall("something else", "noir crime") == 0.0
    # longest common subsequence, not substring: "a c" in "a b c" order
    assert rouge_l_recall("alpha gamma", "alpha beta gamma") == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def memorised():
    lm = tiny_model("llama", seed=1)
    samples = load_qa("builtin:4")
    teach(lm.model, encode_samples(lm.tokenizer, samples),
          TrainConfig(lr=1e-2, epochs=150, batch_size=4, warmup=0.05, weight_decay=0.0),
          pad_token_id=lm.pad_token_id)
    return lm, samples


def test_greedy_answers_of_a_memorised_model(memorised):
    lm, samples = memorised
    answers = greedy_answers(lm, samples, batch_size=3)  # mixed prompt lengths: left padding
    for s in samples:
        assert answers[s.id].startswith(s.answer), (answers[s.id], s.answer)
    # the tiny model never learnt to stop, so its greedy text runs on into the next "word";
    # generating exactly the answer's length gives the answer itself: recall 1
    for s in samples:
        n = sum(encode_sample(lm.tokenizer, s).answer_mask)
        df = evaluate_outcomes(lm, [s], metrics=("exact_mem", "extraction_strength",
                                                 "rougeL_recall"), max_new_tokens=n)
        assert df.loc[s.id, "greedy_answer"] == s.answer
        assert df.loc[s.id, "rougeL_recall"] == 1.0
        assert df.loc[s.id, "extraction_strength"] == 1.0
    assert list(df.columns) == ["exact_mem", "extraction_strength", "n_answer_tokens",
                                "rougeL_recall", "greedy_answer"]


def test_add_perturbed_answers_same_kind():
    samples = add_perturbed_answers(load_qa("builtin:40"), n=3, seed=0)
    for s in samples:
        pert = s.extra["perturbed_answer"]
        assert len(pert) == 3 and len(set(pert)) == 3 and s.answer not in pert
        assert s.extra["paraphrased_answer"] == s.answer
        if s.id.endswith(".birth_year"):
            assert all(p.isdigit() and len(p) == 4 for p in pert)
    # existing perturbations are kept
    custom = QASample("x.y", "Q?", "A", extra={"perturbed_answer": ["B"]})
    assert add_perturbed_answers([custom])[0].extra["perturbed_answer"] == ["B"]


def test_truth_ratio_formula(memorised):
    lm, samples = memorised
    s = QASample("t.1", samples[0].question, samples[0].answer,
                 extra={"perturbed_answer": ["xyz", "qrstu"], "paraphrased_answer": "abc"})
    plain = QASample("t.2", "Q?", "A")
    tr = truth_ratios(lm, [s, plain])
    assert math.isnan(tr["t.2"])
    nll = teacher_forced_outcomes(lm, [QASample("a", s.question, a) for a in ("abc",)]
                                  + [QASample(f"p{i}", s.question, a)
                                     for i, a in enumerate(["xyz", "qrstu"])])["nll"]
    expected = math.exp(nll["a"] - (nll["p0"] + nll["p1"]) / 2)
    assert tr["t.1"] == pytest.approx(expected, rel=1e-6)


def test_truth_ratio_low_when_the_true_answer_is_known(memorised):
    lm, samples = memorised
    tr = truth_ratios(lm, add_perturbed_answers(samples, n=2))
    assert (tr < 0.5).all()


def test_forget_quality_ks_pvalue():
    rng = np.random.default_rng(0)
    a = rng.random(200)
    assert forget_quality(a, a) == pytest.approx(1.0)
    assert forget_quality(a, a + 5.0) < 1e-6
    assert forget_quality(np.append(a, np.nan), a) == pytest.approx(1.0)


def test_deltas_and_forgetting_scores():
    before = pd.DataFrame({"nll": [0.1, 0.2], "prob": [0.9, 0.8], "greedy_answer": ["a", "b"]},
                          index=pd.Index(["s1", "s2"], name="id"))
    after = pd.DataFrame({"nll": [2.1, 0.2], "prob": [0.1, 0.8]}, index=before.index)
    d = outcome_deltas(before, after)
    assert list(d.columns) == ["nll_before", "nll_after", "nll_delta", "prob_before",
                               "prob_after", "prob_delta"]
    assert d.loc["s1", "nll_delta"] == pytest.approx(2.0)
    f = forgetting_scores(d)
    assert f.loc["s1", "nll"] > 0 and f.loc["s1", "prob"] > 0  # both read "more forgotten"
    assert f.loc["s2"].abs().sum() == 0


def test_every_metric_has_a_direction():
    for name, info in METRICS.items():
        assert info.forgotten in ("higher", "lower")
        assert info.direction.endswith("= more forgotten")


def test_save_table_roundtrip(tmp_path):
    df = pd.DataFrame({"nll": [1.0, 2.0], "greedy_answer": ["x", "y"], "nll_delta": [0.5, 0.1]},
                      index=pd.Index(["a", "b"], name="id"))
    parquet, csv = save_outcomes(df, tmp_path / "out" / "outcomes")
    back = pd.read_parquet(parquet)
    pd.testing.assert_frame_equal(back, df)
    assert pd.read_csv(csv, index_col="id").loc["b", "nll"] == 2.0
    meta = json.loads((tmp_path / "out" / "outcomes.metrics.json").read_text())
    assert meta == {"nll": "higher = more forgotten", "nll_delta": "higher = more forgotten"}


def test_model_utility_is_a_harmonic_mean():
    lm = tiny_model("llama")
    u = model_utility(lm, {"retain": add_perturbed_answers(load_qa("builtin:6")),
                           "general": general_knowledge()[:4]})
    parts = [v for k, v in u.items() if k != "model_utility"]
    assert {"retain_prob", "retain_rougeL_recall", "retain_truth", "general_prob"} <= set(u)
    expected = 0.0 if min(parts) <= 0 else len(parts) / sum(1 / v for v in parts)
    assert u["model_utility"] == pytest.approx(expected)


TOFU = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"


@pytest.mark.skipif(not (TOFU / "forget01_perturbed.json").is_file(), reason="no shared TOFU data")
def test_truth_ratio_reads_tofu_perturbed_files():
    samples = load_qa(TOFU / "forget01_perturbed.json", limit=2)
    assert len(samples[0].extra["perturbed_answer"]) == 5
    lm = tiny_model("gpt2")
    tr = truth_ratios(lm, samples)
    # a random model cannot tell true from perturbed: the ratio is near 1
    assert tr.notna().all() and tr.between(0.5, 2.0).all()
