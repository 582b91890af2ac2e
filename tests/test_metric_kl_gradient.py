"""The kl metric keeps its gradient when a run's answer probability is tiny or near 1 (a clamp
on p used to zero it below 1e-6, which zeroed whole EAP-IG score vectors on SmolLM2)."""

from __future__ import annotations

import math

import torch

from cud.circuits.metrics import binary_kl, binary_kl_from_logs, metric_value


def test_kl_from_logs_equals_the_formula_where_no_clamp_applies():
    lpc = torch.tensor([-0.01, -0.5, -2.0, -3.0], dtype=torch.float64)
    lp = torch.tensor([-0.3, -0.5, -1.0, -6.0], dtype=torch.float64)
    assert torch.allclose(binary_kl_from_logs(lpc, lp), binary_kl(lpc.exp(), lp.exp()),
                          rtol=1e-9, atol=1e-12)


def test_kl_gradient_survives_tiny_and_saturated_probabilities():
    clean = torch.tensor([-0.01, -0.2], dtype=torch.float64)
    for value in (-20.0, -60.0, -1e-9):
        lp = torch.full((2,), value, dtype=torch.float64, requires_grad=True)
        metric_value("kl", lp, clean).sum().backward()
        assert torch.isfinite(lp.grad).all() and (lp.grad.abs() > 1e-3).all(), (value, lp.grad)
    # exact derivative: d/dlp KL = -pc + (1 - pc) * p / (1 - p)
    lp = torch.tensor([-20.0], dtype=torch.float64, requires_grad=True)
    metric_value("kl", lp, clean[:1]).backward()
    pc, p = math.exp(-0.01), math.exp(-20.0)
    assert abs(lp.grad.item() - (-pc + (1 - pc) * p / (1 - p))) < 1e-12
