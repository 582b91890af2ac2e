"""Metrics of METHOD §2, computed per sample on the answer tokens (teacher forcing).

Logits are only computed at the positions that predict an answer token (``answer_positions``);
the per-token log-probabilities are then averaged per sample, so every metric returns a (B,)
vector and the batch dimension is never summed away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

METRICS = ("kl", "logprob")

#: p is clamped into [EPS, 1 - EPS] before the binary KL so that it stays finite
EPS = 1e-6


@dataclass
class AnswerTargets:
    """Where the answer tokens are and what they are, for a right-padded batch.

    ``positions``: (B, T) bool, True at position t when token t+1 is an answer token (the logits
    at t predict it). ``tokens``: (N,) the answer tokens, in row-major order of ``positions``.
    ``sample``: (N,) the sample each of them belongs to. ``counts``: (B,) answer tokens per sample.
    """

    positions: Tensor
    tokens: Tensor
    sample: Tensor
    counts: Tensor

    @classmethod
    def from_batch(cls, input_ids: Tensor, answer_mask: Tensor) -> "AnswerTargets":
        positions = torch.zeros_like(answer_mask)
        positions[:, :-1] = answer_mask[:, 1:]
        tokens = input_ids[:, 1:][answer_mask[:, 1:]]
        sample = positions.nonzero()[:, 0]
        counts = positions.sum(1)
        return cls(positions, tokens, sample, counts)

    def mean_logprob(self, logits: Tensor) -> Tensor:
        """(N, vocab) logits at ``positions`` -> (B,) mean answer log-probability, in float32
        (or float64 when the logits are)."""
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logp = torch.log_softmax(logits.to(dtype), dim=-1)
        token_logp = logp.gather(-1, self.tokens[:, None])[:, 0]
        total = torch.zeros(self.counts.shape[0], dtype=dtype, device=logits.device)
        total = total.index_add(0, self.sample, token_logp)
        return total / self.counts.clamp(min=1).to(dtype)


def binary_kl(p_clean: Tensor, p: Tensor) -> Tensor:
    """KL(Bernoulli(p_clean) || Bernoulli(p)), elementwise, in ``p``'s dtype.

    Computed in float64: near p = p_clean its two terms cancel to first order, and float32
    leaves only rounding noise for the second-order remainder (e.g. a change of 1e-4 in log p).
    """
    pc = p_clean.double().clamp(EPS, 1 - EPS)
    q = p.double().clamp(EPS, 1 - EPS)
    kl = pc * (pc.log() - q.log()) + (1 - pc) * (torch.log1p(-pc) - torch.log1p(-q))
    return kl.to(p.dtype)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def binary_kl_from_logs(log_p_clean: Tensor, log_p: Tensor) -> Tensor:
    """KL(Bernoulli(p_clean) || Bernoulli(p)) from log-probabilities, in float64, with no clamp
    on p: a clamp (as :func:`binary_kl` needs) has zero gradient wherever a run's probability
    leaves (EPS, 1 - EPS), which silently zeroed EAP-IG scores of samples whose probability falls
    below 1e-6 along the integration path. Only log p = 0 exactly is moved (to -1e-15)."""
    lpc = log_p_clean.double().clamp(max=-1e-15)
    lq = log_p.double().clamp(max=-1e-15)
    pc = lpc.exp()
    return pc * (lpc - lq) + (1 - pc) * (log1mexp(lpc) - log1mexp(lq))


def metric_value(name: str, mean_logprob: Tensor, clean_mean_logprob: Tensor | None = None
                 ) -> Tensor:
    """Per-sample metric (B,) from per-sample mean answer log-probabilities.

    ``logprob``: the mean answer log-probability itself (ours).
    ``kl``: binary KL between the clean run's length-normalised answer probability
    p = exp(mean logprob) and this run's; 0 at the clean run, where its gradient vanishes too.
    """
    if name == "logprob":
        return mean_logprob
    if name == "kl":
        if clean_mean_logprob is None:
            raise ValueError("the kl metric needs the clean run's mean log-probability")
        # in float64 from the log-probabilities themselves: float32 exp/log round-trips blur
        # log p by ~1e-7 * |log p|, and no clamp stops the gradient at small p
        kl = binary_kl_from_logs(clean_mean_logprob.detach(), mean_logprob)
        return kl.to(mean_logprob.dtype)
    raise ValueError(f"unknown metric '{name}' (choose from {', '.join(METRICS)})")
