"""dM/d(in_v) for every reader v of the graph, per sample, summed over the passes of an
integration path (METHOD §2): what edge attribution contracts with z'_u - z_u.

With a *copies* capture (:mod:`cud.circuits.runner`) every reader's input is its own tensor and
autograd gives its gradient. With a *shared* capture the heads of a layer read one stream x
through one norm ``y = w * P(x) / r + b`` (:class:`~cud.models.adapters.base.ReaderNorm`) and
head k's q (or k, or v) is ``y @ W_k + b_k``; autograd gives dq_k, and head k's own input
gradient is the norm's Jacobian applied to ``W_k dq_k``:

    J^T u = (1/r) [P(w * u) - x_hat (x_hat . (w * u)) / d],      x_hat = P(x) / r.

Summed over the integration passes s, with ``W~_k = diag(w) W_k`` and using
``x_hat . W~_k dq = (q - beta_k) . dq`` (``beta_k = b W_k + b_k``, the projection of zero):

    sum_s J_s^T W_k dq_s = P(W~_k) sum_s dq_s / r_s  -  sum_s x_hat_s c_s,
    c_s = (q_s - beta_k) . dq_s / (d r_s),

so each pass only keeps (B, T, 3H, e) sums, a (B, T, 3H) vector and x_hat_s (B, T, d) per
layer, and the (B, T, 3H, d) per-head gradients are formed once per batch instead of once per
pass. Past 3H passes (the by-layer schedule runs hundreds) the kept x_hat_s c_s terms are folded
into one (B, T, 3H, d) sum per layer, so memory stays bounded by what a copies capture holds.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from cud.circuits.runner import ReaderCapture, ResidualRunner


class ReaderGradients:
    """Accumulates reader-input gradients over passes; :meth:`groups` gives their sums."""

    def __init__(self, runner: ResidualRunner):
        self.runner = runner
        #: float32 sums, float64 for a float64 model
        self.dtype = torch.promote_types(next(runner.adapter.model.parameters()).dtype,
                                         torch.float32)
        self.n_passes = 0
        # per layer, copies: sum of the heads' input gradients (B, T, 3, H, d); shared: sum of
        # dq_s / r_s (B, T, 3, H, e)
        self._attention: list[Tensor] | None = None
        self._mlp: list[Tensor] | None = None
        self._logits: Tensor | None = None
        self._coef: list[list[Tensor]] = []           # shared: per layer, c_s (B, T, 3, H)
        self._x_hat: list[list[Tensor]] = []          # shared: per layer, x_hat_s (B, T, d)
        self._folded: list[Tensor | None] = []        # shared: per layer, sum x_hat_s c_s folded
        self._betas: dict[int, Tensor] = {}
        self._weights: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._shared: bool | None = None

    def add(self, capture: ReaderCapture, values: Tensor) -> None:
        """One pass: ``values`` (B,) the per-sample metric of the run that made ``capture``.
        Samples are independent, so the gradient of the sum is each sample's own gradient."""
        tensors = capture.tensors()
        grads = torch.autograd.grad(values.sum(), tensors, allow_unused=True)
        grads = [torch.zeros_like(x, dtype=self.dtype) if gr is None else gr.to(self.dtype)
                 for gr, x in zip(grads, tensors)]
        per_layer = 4 if capture.shared else 2  # q, k, v, MLP or copies, MLP
        layers = [grads[i:i + per_layer] for i in range(0, len(grads) - 1, per_layer)]
        mlp, logits = [group[-1] for group in layers], grads[-1]
        if self._shared is None:
            self._shared = capture.shared
            self._coef = [[] for _ in layers]
            self._x_hat = [[] for _ in layers]
            self._folded = [None for _ in layers]
        if capture.shared:
            if self._attention is None:
                self._attention = [torch.zeros(q.shape[:2] + (3,) + q.shape[2:], dtype=self.dtype,
                                               device=q.device) for q, *_ in layers]
            for layer, group in enumerate(layers):
                self._shared_pass(layer, capture, group[:3])
        elif self._attention is None:
            self._attention = [group[0] for group in layers]
        else:
            for acc, (new, _) in zip(self._attention, layers):
                acc.add_(new)
        if self._mlp is None:
            self._mlp, self._logits = mlp, logits
        else:
            for acc, new in zip(self._mlp, mlp):
                acc.add_(new)
            self._logits.add_(logits)
        self.n_passes += 1

    @torch.no_grad()
    def _shared_pass(self, layer: int, capture: ReaderCapture, dqkv: list[Tensor]) -> None:
        """Adds this pass's dq_s / r_s to the layer's sum; keeps its c_s and x_hat_s."""
        a = self.runner.adapter
        x_hat, r = a.reader_norm(layer).normalize(capture.stream[layer])
        inv_r = (1.0 / r.to(self.dtype))[..., None]  # (B, T, 1, 1)
        beta = self._beta(layer)
        coef = torch.stack([((x.detach().to(self.dtype) - beta[i]) * dx).sum(-1)
                            for i, (x, dx) in enumerate(zip(capture.qkv[layer], dqkv))], 2)
        self._coef[layer].append(coef * (inv_r / a.d_model))  # (B, T, 3, H)
        self._x_hat[layer].append(x_hat.to(self.dtype))
        acc = self._attention[layer]
        for i, dx in enumerate(dqkv):
            acc[:, :, i].addcmul_(dx, inv_r)
        if len(self._coef[layer]) > 3 * a.n_heads:
            self._fold(layer)

    def _fold(self, layer: int) -> None:
        """Adds the kept x_hat_s c_s terms of ``layer`` into its (3H, B, T, d) sum."""
        coef = self._coef[layer][0]
        b, t, _, h = coef.shape
        if self._folded[layer] is None:
            self._folded[layer] = torch.zeros(3 * h, b, t, self._x_hat[layer][0].shape[-1],
                                              dtype=self.dtype, device=coef.device)
        for coef, x_hat in zip(self._coef[layer], self._x_hat[layer]):
            self._folded[layer].addcmul_(coef.permute(2, 3, 0, 1).reshape(3 * h, b, t, 1), x_hat)
        self._coef[layer], self._x_hat[layer] = [], []

    def _beta(self, layer: int) -> Tensor:
        """(3, H, e): q, k, v of a zero normalised input, ``b W_k + b_k``."""
        if layer not in self._betas:
            self._betas[layer] = self._zero_projection(layer)
        return self._betas[layer]

    def _qkv_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """The adapter's per-head weights of ``layer``, built once per batch."""
        if layer not in self._weights:
            self._weights[layer] = self.runner.adapter.qkv_weights(layer)
        return self._weights[layer]

    def _zero_projection(self, layer: int) -> Tensor:
        a = self.runner.adapter
        weight, bias = self._qkv_weights(layer)
        norm = a.reader_norm(layer)
        weight = weight.to(self.dtype)
        beta = torch.zeros(weight.shape[:2] + weight.shape[3:], dtype=self.dtype,
                           device=weight.device)
        if norm.bias is not None:
            beta = beta + torch.einsum("d,khde->khe", norm.bias.to(self.dtype), weight)
        if bias is not None:
            beta = beta + bias.to(self.dtype)
        return beta

    def groups(self) -> Iterator[Tensor]:
        """The summed gradients (:attr:`dtype`), one (B, V, T, d) tensor per group of V readers,
        in backward-index order: per layer the heads' q, k, v inputs (V = 3H) and the MLP input
        (V = 1), then the logits input (V = 1). Formed one group at a time as the iterator
        advances, so that only one group's (B, 3H, T, d) tensor needs to exist at once."""
        if self._mlp is None:
            raise RuntimeError("no pass was added")
        for layer, (attention, mlp) in enumerate(zip(self._attention, self._mlp)):
            if self._shared:
                yield self._shared_result(layer, attention)
            else:  # (B, T, 3, H, d) -> (B, 3H, T, d)
                yield attention.permute(0, 2, 3, 1, 4).flatten(1, 2)
            yield mlp[:, None]
        yield self._logits[:, None]

    @torch.no_grad()
    def _shared_result(self, layer: int, dq_over_r: Tensor) -> Tensor:
        a = self.runner.adapter
        b, t, _, h, e = dq_over_r.shape
        norm = a.reader_norm(layer)
        weight, _ = self._qkv_weights(layer)
        del self._weights[layer]  # the layer's last use in this batch
        w_t = weight.transpose(2, 3).to(self.dtype)  # (3, H, e, d)
        if norm.weight is not None:
            w_t = w_t * norm.weight.to(self.dtype)
        if norm.kind == "layer":
            w_t = w_t - w_t.mean(3, keepdim=True)
        # P(W~_k) sum_s dq_s / r_s for every reader k at once: (3H, B*T, e) @ (3H, e, d)
        sums = dq_over_r.permute(2, 3, 0, 1, 4).reshape(3 * h, b * t, e)
        grad = torch.bmm(sums, w_t.reshape(3 * h, e, -1)).view(3 * h, b, t, -1)
        # minus sum_s x_hat_s c_s, one fused pass per integration step (and the folded ones)
        for coef, x_hat in zip(self._coef[layer], self._x_hat[layer]):
            grad.addcmul_(coef.permute(2, 3, 0, 1).reshape(3 * h, b, t, 1), x_hat, value=-1)
        if self._folded[layer] is not None:
            grad.sub_(self._folded[layer])
            self._folded[layer] = None
        return grad.transpose(0, 1)  # (B, 3H, T, d), a view
