"""Each unlearning loss equals its formula on a small hand-computed case, and the packed answer
logits equal the full forward pass."""

import math

import pytest
import torch

from cud.data import collate, encode_samples, load_qa
from cud.models.tiny import tiny_model
from cud.unlearning.methods import (ga_loss, make_method, npo_loss, rmu_loss, simnpo_loss,
                                    undial_loss, undial_targets)
from cud.models.answers import answer_logits
from cud.errors import ConfigError


def test_ga_is_minus_mean_nll():
    assert ga_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_npo_formula():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    beta = 0.5
    # (2/β)·mean log(1 + (π/π_ref)^β) with π/π_ref = e^{0.5}, e^{-1}
    expected = (2 / beta) * 0.5 * (math.log(1 + math.exp(0.5) ** beta)
                                  + math.log(1 + math.exp(-1.0) ** beta))
    assert npo_loss(logp, ref, beta).item() == pytest.approx(expected, rel=1e-6)


def test_npo_at_reference_is_constant():
    # π = π_ref: (2/β)·log 2 whatever the likelihoods
    logp = torch.tensor([-3.0, -0.1])
    assert npo_loss(logp, logp.clone(), 2.0).item() == pytest.approx(math.log(2), rel=1e-6)


def test_simnpo_formula():
    nll = torch.tensor([1.0, 2.0])  # -(1/|y|) log π
    beta, gamma = 2.0, 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))
    # -(2/β)·mean log σ(-(β/|y|) log π - γ) = -(2/β)·mean log σ(β·nll - γ)
    expected = -(2 / beta) * 0.5 * (math.log(sig(2 * 1 - 0.5)) + math.log(sig(2 * 2 - 0.5)))
    assert simnpo_loss(nll, beta, gamma).item() == pytest.approx(expected, rel=1e-6)


def test_rmu_formula():
    h_f = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    control = torch.tensor([1.0, 1.0])
    # MSE to c·u: ((0)² + 1² + 2² + 3²) / 4 = 3.5
    assert rmu_loss(h_f, None, None, control, 1.0).item() == pytest.approx(3.5)
    h_r = torch.tensor([[1.0, 1.0]])
    h_r0 = torch.tensor([[0.0, 3.0]])
    # + α·((1)² + (2)²)/2 = α·2.5
    assert rmu_loss(h_f, h_r, h_r0, control, 2.0).item() == pytest.approx(3.5 + 5.0)


def test_undial_targets_and_loss():
    frozen = torch.zeros(1, 3)
    target = torch.tensor([0])
    teacher = undial_targets(frozen, target, beta=math.log(2))
    # logits (-ln 2, 0, 0) -> probabilities (0.5, 1, 1) / 2.5
    assert teacher.tolist()[0] == pytest.approx([0.2, 0.4, 0.4], rel=1e-6)
    student = torch.zeros(1, 3)  # uniform 1/3
    expected = sum(t * math.log(t * 3) for t in (0.2, 0.4, 0.4))  # KL(teacher ‖ student)
    loss = undial_loss(student, teacher, torch.tensor([0]), torch.tensor([1]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the student at the teacher: no loss
    assert undial_loss(teacher.log(), teacher, torch.tensor([0]), torch.tensor([1])).item() \
        == pytest.approx(0.0, abs=1e-6)


def test_undial_averages_tokens_then_samples():
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    student = torch.zeros(3, 2)  # uniform: KL 0, log 2, 0
    rows = torch.tensor([0, 0, 1])  # sample 0 has two tokens, sample 1 one
    loss = undial_loss(student, teacher, rows, torch.tensor([2, 1]))
    assert loss.item() == pytest.approx(0.5 * (math.log(2) / 2 + 0.0), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_packed_answer_logits_match_full_forward(family):
    lm = tiny_model(family)
    batch = collate(encode_samples(lm.tokenizer, load_qa("builtin:5")), lm.pad_token_id)
    packed = answer_logits(lm.model, batch)
    with torch.no_grad():
        full = lm.model(input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask.long()).logits[:, :-1]
    logp = full.log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.target_mask.float()
    expected = -(logp * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(packed.nll().detach(), expected, rtol=1e-5, atol=1e-5)
    assert packed.logits.shape[0] == int(batch.target_mask.sum())


def test_make_method_rejects_unknown():
    with pytest.raises(ConfigError, match="unknown unlearning method"):
        make_method("forget-it-all")
    with pytest.raises(ConfigError, match="no hyperparameter"):
        make_method("npo", gamma=1.0)
