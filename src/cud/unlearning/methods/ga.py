"""GA and GradDiff: climb the forget set's NLL (and, for GradDiff, descend the retain set's)."""

from __future__ import annotations

from dataclasses import dataclass

from cud.unlearning.methods.base import UnlearningMethod
from cud.models.answers import answer_nll


def ga_loss(nll_forget):
    """GA: -NLL_f. ``nll_forget`` (B,) per-sample mean answer NLL."""
    return -nll_forget.mean()


@dataclass
class GA(UnlearningMethod):
    """Gradient ascent: minimise -NLL_f."""

    name = "ga"

    def loss(self, model, forget, retain):
        nll_f = answer_nll(model, forget)
        return ga_loss(nll_f), {"nll_forget": float(nll_f.mean().detach())}


@dataclass
class GradDiff(UnlearningMethod):
    """Gradient difference: minimise -NLL_f + α·NLL_r."""

    name = "graddiff"
    uses_retain = True
    alpha: float = 5.0

    def loss(self, model, forget, retain):
        nll_f = answer_nll(model, forget)
        retain_loss, logs = self.retain_term(model, retain, self.alpha)
        return ga_loss(nll_f) + retain_loss, {"nll_forget": float(nll_f.mean().detach()), **logs}
