"""Does a circuit explain the behaviour? (METHOD §3.)

Run the model with every edge *outside* the circuit patched to its baseline and measure how much
of the metric is recovered: (M_circuit - M_baseline) / (M_clean - M_baseline), per sample, where
M_baseline is the run with every edge patched. 1 for the full graph, 0 for the empty circuit.
Each sample of a batch is evaluated with its own circuit in one patched pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cud.circuits.ablation import Ablation
from cud.circuits.metrics import AnswerTargets, metric_value
from cud.circuits.runner import EdgePatch, ResidualRunner
from cud.data.encoding import Batch


@dataclass
class Faithfulness:
    """Per-sample results (B,) on CPU."""

    faithfulness: Tensor
    metric_clean: Tensor
    metric_circuit: Tensor
    metric_baseline: Tensor


def patched_metric(runner: ResidualRunner, batch: Batch, keep_edges: Tensor, z_base: Tensor,
                   metric: str, targets: AnswerTargets, clean_logprob: Tensor, *,
                   token_input: bool = False) -> Tensor:
    """Per-sample metric with edges kept where ``keep_edges`` (B or 1, E) is 1, patched elsewhere."""
    keep = runner.graph.to_matrix(keep_edges.to(z_base.dtype))
    with torch.no_grad():
        run = runner.run(batch.input_ids, batch.attention_mask, logit_mask=targets.positions,
                         patch=EdgePatch(keep=keep, baseline=z_base), token_input=token_input)
        return metric_value(metric, targets.mean_logprob(run.logits), clean_logprob)


def faithfulness(runner: ResidualRunner, batch: Batch, circuits: Tensor,
                 ablation: Ablation, metric: str = "kl",
                 clean_logprob: Tensor | None = None, z_base: Tensor | None = None,
                 token_input: bool = False) -> Faithfulness:
    """Faithfulness of each sample's circuit. ``circuits``: (B, n_edges) bool (or float in [0,1]).
    ``clean_logprob``: the batch's clean mean answer log-probabilities (B,) when already known
    (:class:`~cud.circuits.attribution.Attribution` has them), else a clean run computes them.
    ``z_base``: ``ablation``'s activations of this batch when already computed."""
    device = next(runner.adapter.model.parameters()).device
    batch = batch.to(device)
    circuits = circuits.to(device)
    targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    with torch.no_grad():
        if clean_logprob is None:
            clean = runner.run(batch.input_ids, batch.attention_mask,
                               logit_mask=targets.positions)
            clean_logprob = targets.mean_logprob(clean.logits)
        clean_logprob = clean_logprob.to(device)
        if z_base is None:
            z_base = ablation.for_batch(runner, batch, token_input=token_input)
        m_clean = metric_value(metric, clean_logprob, clean_logprob)
        empty = torch.zeros(1, runner.graph.n_edges, device=device)
        m_base = patched_metric(runner, batch, empty, z_base, metric, targets, clean_logprob,
                                token_input=token_input)
        m_circ = patched_metric(runner, batch, circuits, z_base, metric, targets, clean_logprob,
                                token_input=token_input)
    denom = m_clean - m_base
    safe = torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
    faith = torch.where(denom.abs() > 1e-12, (m_circ - m_base) / safe,
                        torch.full_like(denom, float("nan")))
    return Faithfulness(*(x.float().cpu() for x in (faith, m_clean, m_circ, m_base)))
