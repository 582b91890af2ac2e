"""Edge attribution, per sample, for a whole batch in one set of passes (METHOD §2).

For every edge u -> v:  score(u -> v) = (z'_u - z_u) · mean_k dM/d(in_v) |_(alpha_k),
summed over positions and the hidden dimension. One backward pass gives dM/d(in_v) for every
reader v at once; the product with (z' - z) keeps the batch dimension, so a batch of B samples
gives B score vectors.

Methods:
- ``eap``: one gradient at the clean run (alpha = 1).
- ``eap-ig-inputs``: the input embeddings move on the straight line from the baseline to the
  clean embeddings, alpha = k/m, k = 1..m (Hanna et al. 2024).
- ``eap-ig-activations`` (default): every node's output moves on that line at once, alpha = k/m,
  with gradients taken through each node's own computation (ours: one pass per step for the
  whole graph).
- ``eap-ig-activations-by-layer``: the reference code's schedule. The node groups (the input,
  then each layer's attention and each layer's MLP: 2L + 1 groups) move on that line one group
  at a time, every other node clean; the gradients of all (2L + 1) m passes are averaged. The
  alpha = 1 pass is the same clean run for every group, so it runs once: (2L + 1)(m - 1) + 1
  passes.

With ``convention="reference"`` the scores are those of the reference EAP-IG code
(hannamw/EAP-IG, the code of the EAP-IG paper, MIB and the CUD paper) on the same tokens:

- ``eap-ig-inputs`` integrates at alpha = k/m for k = 0..m-1 (the corrupted point included, the
  clean one left out), from a separate clean run;
- ``eap-ig-activations-by-layer`` replaces the moving group's output by a *constant* (no gradient
  flows back through it, so the group's own readers get none in its passes), at alpha = k/m,
  k = 1..m for every group: (2L + 1) m gradient passes; with the ``zero`` and ``mean``
  ablations the path starts at 0 (the reference has no run to start it elsewhere) while the
  score still multiplies by (ablation - clean);
- ``input`` is the token embedding alone (the reference's ``hook_embed``); a model's position
  embeddings (GPT-2) are a constant of the stream, which the zero and mean ablations leave in;
- the joint ``eap-ig-activations`` schedule is ours; it has no reference counterpart.

Moving *every* node towards the zero baseline at once only rescales the residual stream, which a
model whose readers normalise their input cannot see (every supported family), and the
straight-through gradients then grow by 1/alpha at every layer they cross: on SmolLM2 the
scores reached 1e13 to 1e21. That combination is refused (:func:`check_method_and_ablation`);
the zero baseline works with the other three methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from cud.circuits.ablation import Ablation
from cud.circuits.gradients import ReaderGradients
from cud.circuits.metrics import METRICS, AnswerTargets, metric_value
from cud.circuits.runner import Interpolation, ResidualRunner
from cud.data.encoding import Batch
from cud.errors import ConfigError

METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations", "eap-ig-activations-by-layer")
#: ``cud``: this project's conventions; ``reference``: those of the reference EAP-IG code
#: (hannamw/EAP-IG): the module docstring and the README's table say what differs
CONVENTIONS = ("cud", "reference")


def check_method_and_ablation(method: str, baseline: str, reference: bool = False) -> None:
    """Refuse the combinations whose scores are meaningless or have no reference form (see the
    module docstring)."""
    if reference and method == "eap-ig-inputs" and baseline != "corrupt":
        raise ConfigError("the reference EAP-IG code integrates inputs only from a corrupted "
                          "input (intervention 'patching'): use --ablation corrupt")
    if method == "eap-ig-activations" and baseline == "zero":
        raise ConfigError(
            "eap-ig-activations with the zero baseline moves every node's output towards 0 at "
            "once: that only rescales the residual stream, which a model whose layers normalise "
            "their input cannot see, and its gradients grow by 1/alpha per layer. Use --ablation "
            "corrupt or mean, --method eap-ig-activations-by-layer (the reference code's "
            "schedule), eap-ig-inputs, or eap with --metric logprob")


@dataclass(frozen=True)
class AttributionSettings:
    method: str = "eap-ig-activations"
    steps: int = 5
    metric: str = "kl"
    convention: str = "cud"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown attribution method '{self.method}' "
                              f"(choose from {', '.join(METHODS)})")
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"unknown convention '{self.convention}' "
                              f"(choose from {', '.join(CONVENTIONS)})")
        if self.reference and self.method == "eap-ig-activations":
            raise ConfigError("the reference EAP-IG code moves one node group at a time: use "
                              "eap-ig-activations-by-layer with convention reference (the joint "
                              "eap-ig-activations schedule is cud's own)")
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric '{self.metric}' (choose from {', '.join(METRICS)})")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if self.method == "eap" and self.metric == "kl":
            raise ConfigError("the kl metric has zero gradient at the clean run, so plain eap "
                              "scores every edge 0; use eap-ig-* or --metric logprob")

    @property
    def reference(self) -> bool:
        return self.convention == "reference"

    @property
    def alphas(self) -> list[float]:
        if self.method == "eap":
            return [1.0]
        if self.reference and self.method == "eap-ig-inputs":
            return [k / self.steps for k in range(self.steps)]
        return [k / self.steps for k in range(1, self.steps + 1)]

    def n_passes(self, n_layers: int) -> int:
        """Forward + backward passes per batch on a model of ``n_layers`` layers (the
        reference convention's clean run, without a backward pass, not counted)."""
        groups = 2 * n_layers + 1
        if self.method == "eap-ig-activations-by-layer":
            return groups * self.steps if self.reference else groups * (self.steps - 1) + 1
        return len(self.alphas)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Attribution:
    """Result for one batch. ``edge_scores``: (B, n_edges) float32 on CPU.
    ``clean_logprob``: (B,) mean answer log-probability of the clean run."""

    ids: list[str]
    edge_scores: Tensor
    clean_logprob: Tensor


def attribute(runner: ResidualRunner, batch: Batch, ablation: Ablation,
              settings: AttributionSettings = AttributionSettings(), *,
              z_base: Tensor | None = None) -> Attribution:
    """Score every edge of ``runner.graph`` for every sample of ``batch``.

    In cud's convention every method's integration path ends at alpha = 1, where each node's
    interpolated output is its clean output: that pass is the clean run itself, so it also
    records the clean node outputs and log-probabilities the other passes need (one pass per
    step, no extra clean forward). The reference convention runs the clean run apart."""
    g, a = runner.graph, runner.adapter
    device = next(a.model.parameters()).device
    batch = batch.to(device)
    b, t = batch.input_ids.shape
    d = a.d_model
    targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    gradients = ReaderGradients(runner)  # sums of dM/d(in_v) over the integration steps
    reference = settings.reference
    check_method_and_ablation(settings.method, ablation.name, reference)

    def gradient_pass(interpolation: Interpolation | None, record: bool = False,
                      weight: int = 1):
        with torch.enable_grad():
            run = runner.run(batch.input_ids, batch.attention_mask,
                             logit_mask=targets.positions, capture=True, record=record,
                             interpolation=interpolation, token_input=reference)
            logprob = targets.mean_logprob(run.logits)
            clean = logprob.detach() if record else clean_logprob
            values = metric_value(settings.metric, logprob, clean)
            gradients.add(run.capture, values * weight)
        return run.outputs, logprob.detach()

    alphas = settings.alphas
    node_groups = _node_groups(g, a.n_layers, settings.method)
    if reference and settings.method != "eap":
        with torch.no_grad():  # the clean run, apart from the gradient passes
            clean_run = runner.run(batch.input_ids, batch.attention_mask,
                                   logit_mask=targets.positions, record=True, token_input=True)
        clean_outputs = clean_run.outputs
        clean_logprob = targets.mean_logprob(clean_run.logits)
        gradient_alphas = alphas
    else:
        # the alpha = 1 pass stands for every group's (identical) clean pass
        assert alphas[-1] == 1.0
        clean_outputs, clean_logprob = gradient_pass(None, record=True,
                                                     weight=len(node_groups))
        gradient_alphas = alphas[:-1]
    with torch.no_grad():
        if z_base is None:
            z_base = ablation.for_batch(runner, batch, token_input=reference)
        # (B, F, T, d): z' - z on real tokens, 0 on padding, each node's values contiguous so
        # that a prefix of nodes is a (B, n_up, T * d) matrix to contract with a bmm
        delta = torch.empty(b, g.n_forward, t, d, dtype=clean_outputs.dtype, device=device)
        torch.sub(z_base.expand_as(clean_outputs).transpose(1, 2),
                  clean_outputs.transpose(1, 2), out=delta)
        delta.mul_(batch.attention_mask[:, None, :, None])
    if gradient_alphas:
        # the reference's paths of the zero and mean ablations start at 0
        start = torch.zeros_like(z_base) if reference and ablation.name != "corrupt" else z_base
        path = Interpolation(clean=clean_outputs, baseline=start, alpha=1.0,
                             input_only=settings.method == "eap-ig-inputs",
                             straight_through=not reference)
        for group in node_groups:
            for alpha in gradient_alphas:
                gradient_pass(path.at(alpha, group))
    del clean_outputs

    scale = 1.0 / (len(node_groups) * len(alphas))
    matrix = torch.zeros(b, g.n_forward, g.n_backward, dtype=torch.float32, device=device)
    delta_flat = delta.view(b, g.n_forward, t * d)

    def contract(n_up: int, v0: int, grad: Tensor) -> None:
        """grad (B, V, T, d) of readers v0.. -> the scores of their edges from the first n_up
        nodes, into ``matrix``."""
        v = grad.shape[1]
        scores = torch.bmm(grad.reshape(b, v, t * d).to(delta.dtype),
                           delta_flat[:, :n_up].transpose(1, 2))  # (B, V, n_up)
        matrix[:, :n_up, v0:v0 + v] = scores.transpose(1, 2).float() * scale

    reader_grads = gradients.groups()
    for layer in range(a.n_layers):
        contract(g.attention_readers_upstream(layer), g.qkv_backward(layer, 0, 0),
                 next(reader_grads))
        contract(g.mlp_readers_upstream(layer), g.mlp_backward(layer), next(reader_grads))
    contract(g.n_forward, g.logits_backward, next(reader_grads))
    edge_scores = g.from_matrix(matrix).cpu()
    return Attribution(ids=list(batch.ids), edge_scores=edge_scores,
                       clean_logprob=clean_logprob.float().cpu())


def _node_groups(g, n_layers: int, method: str) -> list:
    """The node groups moved one at a time (by layer: the input, each layer's heads, each
    layer's MLP), or [None]: all at once."""
    if method != "eap-ig-activations-by-layer":
        return [None]
    groups = [(0, 1)]
    for layer in range(n_layers):
        f0 = g.head_forward(layer, 0)
        groups += [(f0, f0 + g.n_heads), (g.mlp_forward(layer), g.mlp_forward(layer) + 1)]
    return groups
