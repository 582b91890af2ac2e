"""Baseline difficulty metrics: MRD's limits and resumption, Min-K%, gradient norms, caching."""

import math

import numpy as np
import pytest
import torch

from cud.data import load_qa
from cud.difficulty.baselines import (BASELINE_METRICS, BaselineSettings, baseline_metrics, gradient_norms, min_k_prob,
                                      mrd)
from cud.errors import ConfigError
from cud.models.tiny import tiny_model
from cud.models.answers import teacher_forced_outcomes
from cud.models.answers import answer_logits
from cud.data import collate, encode_samples


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def samples():
    return load_qa("builtin:6")


def test_mrd_is_zero_without_noise(lm, samples):
    values = mrd(lm, samples, sigma=0.0, k=3)
    assert (values == 0.0).all()


def test_mrd_grows_with_sigma(lm, samples):
    means = [mrd(lm, samples, sigma=s, k=4).mean() for s in (1e-4, 1e-3, 1e-2)]
    assert means[0] < means[1] < means[2]
    assert all(0 <= m <= 2 for m in means)


def test_mrd_restores_the_weights(lm, samples):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    mrd(lm, samples, sigma=1e-2, k=2)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_mrd_resumes_to_the_same_result(lm, samples, tmp_path):
    full = mrd(lm, samples, sigma=1e-3, k=4, seed=7)
    ckpt = tmp_path / "mrd.npz"

    def stop_after_two(task, done, total, info=""):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mrd(lm, samples, sigma=1e-3, k=4, seed=7, checkpoint=ckpt, progress=stop_after_two)
    seen = []
    resumed = mrd(lm, samples, sigma=1e-3, k=4, seed=7, checkpoint=ckpt,
                  progress=lambda task, d, t, info: seen.append(d))
    assert seen == [3, 4]  # only the missing draws ran
    np.testing.assert_allclose(resumed.to_numpy(), full.to_numpy(), rtol=1e-12)


def test_target_logprobs_stay_nonzero_where_float32_rounds_to_certainty():
    from cud.difficulty.baselines import _target_logprobs
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(4, 50)), dtype=torch.float32)
    targets = torch.tensor([3, 7, 11, 0])
    logits[0, 3] += 30.0   # memorised: float32 log-softmax says exactly 0
    logits[1, 7] += 60.0   # beyond a float64 log-softmax too (gap > 37 + ln 50)
    got = _target_logprobs(logits, targets)
    assert got.dtype == torch.float64
    assert logits.log_softmax(-1)[0, 3] == 0.0 and logits.log_softmax(-1)[1, 7] == 0.0
    for row in range(4):  # exact: log p_t = -log1p(sum_j!=t exp(x_j - x_t)) in Python floats
        x = logits[row].double().tolist()
        t = int(targets[row])
        rest = sum(math.exp(v - x[t]) for j, v in enumerate(x) if j != t)
        assert got[row].item() == pytest.approx(-math.log1p(rest), rel=1e-9, abs=0)
        assert got[row].item() < 0


def test_mrd_is_defined_for_a_memorised_answer(samples):
    """A sample whose first answer token the model is certain of (float32 log-prob exactly 0)
    got MRD = 0/0 = NaN; the float64 log-probabilities keep every sample finite."""
    lm = tiny_model("llama", seed=3)
    batch = collate(encode_samples(lm.tokenizer, samples[:1]), lm.pad_token_id)
    first = int(answer_logits(lm.model, batch).targets[0])
    head = lm.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[first] = 40.0
    lm.model.lm_head = biased
    al = answer_logits(lm.model, batch)
    assert al.token_logprobs()[0] == 0.0  # the precondition: float32 says certain
    values = mrd(lm, samples, sigma=1e-3, k=2)
    assert values.notna().all() and np.isfinite(values).all()
    assert (values > 0).all()


def test_mrd_all_tokens_option_and_errors(lm, samples):
    assert mrd(lm, samples, sigma=1e-3, k=2, tokens="all").notna().all()
    with pytest.raises(ConfigError):
        mrd(lm, samples, tokens="some")
    with pytest.raises(ConfigError):
        mrd(lm, samples, k=0)
    half = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="float32"):
        mrd(half, samples, sigma=1e-5, k=1)


def test_min_k_prob(lm, samples):
    whole = min_k_prob(lm, samples, k=1.0)
    nll = teacher_forced_outcomes(lm, samples)["nll"]
    np.testing.assert_allclose(whole.to_numpy(), -nll.to_numpy(), rtol=1e-5)
    low = min_k_prob(lm, samples, k=0.2)
    assert (low <= whole + 1e-9).all()


def test_gradient_norm_matches_a_manual_backward(lm, samples):
    norms = gradient_norms(lm, samples[:2])
    model = lm.model
    model.zero_grad()
    batch = collate(encode_samples(lm.tokenizer, samples[1:2]), lm.pad_token_id)
    answer_logits(model, batch).nll().sum().backward()
    manual = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    model.zero_grad()
    assert norms.iloc[1] == pytest.approx(manual, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_baseline_table_and_cache(lm, samples, tmp_path):
    settings = BaselineSettings(mrd_k=2, mrd_sigma=1e-3)
    table = baseline_metrics(lm, samples, settings, work_dir=tmp_path)
    assert list(table.columns) == list(BASELINE_METRICS)
    assert list(table.index) == [s.id for s in samples]
    assert table.notna().all().all()
    cached = sorted(p.name for p in tmp_path.glob("baseline.*.parquet"))
    assert len(cached) == 4  # teacher-forced, min-k, grad norm, MRD
    calls = []
    again = baseline_metrics(lm, samples, settings, work_dir=tmp_path,
                             progress=lambda name, d, t, info: calls.append(name))
    assert calls == []  # nothing recomputed
    np.testing.assert_allclose(again.to_numpy(), table.to_numpy())
    with pytest.raises(ConfigError):
        BaselineSettings(metrics=("loss", "vibes"))
