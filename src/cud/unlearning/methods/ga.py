"""GA and GradDiff: climb the forget set's NLL (and, for GradDiff, descend the retain set's)."""

from __future__ import annotations

from dataclasses import dataclass

from cud.unlearning.methods.base import UnlearningMethod, sample_mean
from cud.models.answers import answer_nll


def ga_loss(nll_forget, weights=None):
    """GA: -NLL_f. ``nll_forget`` (B,) per-sample mean answer NLL; ``weights`` (B,) or None
    (:func:`sample_mean`)."""
    return -sample_mean(nll_forget, weights)


@dataclass
class GA(UnlearningMethod):
    """Gradient ascent: minimise -NLL_f."""

    name = "ga"

    def loss(self, model, forget, retain):
        nll_f = answer_nll(model, forget)
        return ga_loss(nll_f, forget.weights), {"nll_forget": float(nll_f.mean().detach())}


@dataclass
class GradDiff(UnlearningMethod):
    """Gradient difference: minimise -NLL_f + α·NLL_r."""

    name = "graddiff"
    uses_retain = True
    alpha: float = 5.0

    def loss(self, model, forget, retain):
        nll_f = answer_nll(model, forget)
        retain_loss, logs = self.retain_term(model, retain, self.alpha)
        return ga_loss(nll_f, forget.weights) + retain_loss, {
            "nll_forget": float(nll_f.mean().detach()), **logs}
