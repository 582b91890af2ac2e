"""NPO and SimNPO: preference-style losses that push the forget answers' likelihood down with a
bounded (log-sigmoid) objective instead of GA's unbounded one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cud.unlearning.methods.base import UnlearningMethod, sample_mean
from cud.models.answers import answer_logits


def npo_loss(logp_forget: Tensor, logp_reference: Tensor, beta: float,
             weights: Tensor | None = None) -> Tensor:
    """(2/β)·E_f[log(1 + (π_θ(y|x)/π_ref(y|x))^β)].

    ``logp_*`` (B,) are log π(y|x), sums over answer tokens. log(1 + e^{βΔ}) = softplus(βΔ).
    ``weights`` (B,): the weighted mean over samples (:func:`sample_mean`).
    """
    return (2.0 / beta) * sample_mean(F.softplus(beta * (logp_forget - logp_reference)), weights)


def simnpo_loss(nll_forget: Tensor, beta: float, gamma: float,
                weights: Tensor | None = None) -> Tensor:
    """-(2/β)·E_f[log σ(-(β/|y|)·log π_θ(y|x) - γ)].

    ``nll_forget`` (B,) is the mean answer NLL per token, i.e. -(1/|y|)·log π_θ(y|x), so the
    argument of σ is β·NLL - γ. (γ is not multiplied by β, as in the SimNPO paper's formula.)
    ``weights`` (B,): the weighted mean over samples (:func:`sample_mean`).
    """
    return -(2.0 / beta) * sample_mean(F.logsigmoid(beta * nll_forget - gamma), weights)


@dataclass
class NPO(UnlearningMethod):
    """Negative preference optimisation + α·NLL_r. π_ref is the frozen original model."""

    name = "npo"
    needs_reference = True
    uses_retain = True
    beta: float = 0.5
    alpha: float = 1.0
    # log π_ref(y|x) per sample id: the reference never changes, so each is computed once
    _reference_logp: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def hyperparameters(self) -> dict:
        return {"beta": self.beta, "alpha": self.alpha}

    def reference_logp(self, forget) -> Tensor:
        missing = [i for i, sid in enumerate(forget.ids) if sid not in self._reference_logp]
        if missing:
            with torch.no_grad():
                ref = answer_logits(self.reference, forget).sequence_logprob()
            for i in missing:
                self._reference_logp[forget.ids[i]] = float(ref[i])
        return torch.tensor([self._reference_logp[sid] for sid in forget.ids],
                            device=forget.input_ids.device)

    def loss(self, model, forget, retain):
        logits = answer_logits(model, forget)
        logp = logits.sequence_logprob()
        forget_loss = npo_loss(logp, self.reference_logp(forget), self.beta, forget.weights)
        retain_loss, logs = self.retain_term(model, retain, self.alpha)
        return forget_loss + retain_loss, {"npo": float(forget_loss.detach()),
                                           "nll_forget": float(logits.nll().mean().detach()),
                                           **logs}


@dataclass
class SimNPO(UnlearningMethod):
    """Simple NPO (no reference model): length-normalised NPO with a margin γ, + α·NLL_r."""

    name = "simnpo"
    uses_retain = True
    beta: float = 3.5
    gamma: float = 0.25
    alpha: float = 1.0

    def loss(self, model, forget, retain):
        nll_f = answer_logits(model, forget).nll()
        forget_loss = simnpo_loss(nll_f, self.beta, self.gamma, forget.weights)
        retain_loss, logs = self.retain_term(model, retain, self.alpha)
        return forget_loss + retain_loss, {"simnpo": float(forget_loss.detach()),
                                           "nll_forget": float(nll_f.mean().detach()), **logs}
