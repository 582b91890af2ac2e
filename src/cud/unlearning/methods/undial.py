"""UNDIAL: self-distillation towards the frozen model with the true token's logit lowered by β,
so the answer loses probability mass smoothly instead of being pushed without bound."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cud.unlearning.methods.base import UnlearningMethod, sample_mean
from cud.models.answers import answer_logits


def undial_targets(reference_logits: Tensor, targets: Tensor, beta: float) -> Tensor:
    """(N, V) teacher distribution: softmax of the frozen logits with logit[target] - β."""
    adjusted = reference_logits.float().clone()
    adjusted[torch.arange(len(targets), device=targets.device), targets] -= beta
    return adjusted.softmax(-1)


def undial_loss(student_logits: Tensor, teacher_probs: Tensor, rows: Tensor, n_tokens: Tensor,
                weights: Tensor | None = None) -> Tensor:
    """KL(teacher ‖ student) per answer token, mean over a sample's tokens, mean over samples.

    Same gradient as the reference code's soft-label cross-entropy (they differ by the teacher's
    entropy, a constant), but 0 when the student matches the teacher. ``weights`` (B,): the
    weighted mean over samples (:func:`sample_mean`).
    """
    log_student = student_logits.float().log_softmax(-1)
    kl = (teacher_probs * (teacher_probs.clamp_min(1e-30).log() - log_student)).sum(-1)  # (N,)
    per_sample = torch.zeros(len(n_tokens), device=kl.device).index_add(0, rows, kl)
    return sample_mean(per_sample / n_tokens.float(), weights)


@dataclass
class UNDIAL(UnlearningMethod):
    """Unlearning via self-distillation on adjusted logits (Dong et al. 2024) + α·NLL_r."""

    name = "undial"
    needs_reference = True
    uses_retain = True
    beta: float = 10.0
    alpha: float = 2.0

    def hyperparameters(self) -> dict:
        return {"beta": self.beta, "alpha": self.alpha}

    def loss(self, model, forget, retain):
        student = answer_logits(model, forget)
        with torch.no_grad():
            teacher = undial_targets(answer_logits(self.reference, forget).logits,
                                     student.targets, self.beta)
        forget_loss = undial_loss(student.logits, teacher, student.rows, student.n_tokens,
                                  forget.weights)
        retain_loss, logs = self.retain_term(model, retain, self.alpha)
        return forget_loss + retain_loss, {"undial_kl": float(forget_loss.detach()),
                                           "nll_forget": float(student.nll().mean().detach()),
                                           **logs}
