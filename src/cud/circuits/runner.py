"""One forward pass through the residual-stream view, with the three things attribution and
evaluation need on top of a plain forward:

- **record** every forward node's output (B, T, F, d);
- **patch edges**: reader v's input becomes ``resid - sum_u (1 - keep[u, v]) * (z_u - z'_u)``,
  i.e. edge u->v carries the baseline activation z'_u instead of z_u (METHOD §1, §3); ``keep`` may
  differ per sample, so a batch can evaluate a different circuit for every sample;
- **capture reader inputs** as separate tensors (every head's q, k and v input its own copy) so
  one backward pass gives dM/d(in_v) for every reader v, per sample;
- **interpolate** node outputs: each node's output takes the value ``z'_u + alpha (z_u - z'_u)``
  while gradients flow through the node's own computation (straight-through), for EAP-IG over
  activations; or replace only the input node's output (EAP-IG over inputs).

The runner knows graph indices, never module names: those stay in the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cud.circuits.graph import Graph
from cud.models.adapters.base import ResidualAdapter


@dataclass
class EdgePatch:
    """Which edges keep their clean value. ``keep``: (B or 1, F, Bk) float in [0, 1] (1 = clean).
    ``baseline``: (B or 1, T or 1, F, d) activations z'_u carried by patched edges."""

    keep: Tensor
    baseline: Tensor


@dataclass
class Interpolation:
    """Node outputs set to ``baseline + alpha * (clean - baseline)``. ``clean``: (B, T, F, d);
    ``baseline``: broadcastable to it. ``input_only``: only the input node (EAP-IG over inputs)."""

    clean: Tensor
    baseline: Tensor
    alpha: float
    input_only: bool = False


@dataclass
class RunOutput:
    logits: Tensor                       # (N, vocab) at the selected positions
    outputs: Tensor | None = None        # (B, T, F, d) recorded node outputs
    reader_inputs: list[Tensor] | None = None  # per layer [attn (B,T,3,H,d), mlp (B,T,d)], logits


class ResidualRunner:
    def __init__(self, adapter: ResidualAdapter, graph: Graph | None = None):
        self.adapter = adapter
        self.graph = graph or Graph.from_adapter(adapter)

    def run(self, input_ids: Tensor, attention_mask: Tensor, *, logit_mask: Tensor | None = None,
            record: bool = False, patch: EdgePatch | None = None,
            interpolation: Interpolation | None = None, capture: bool = False) -> RunOutput:
        """Forward pass. ``logit_mask`` (B, T) bool picks the positions whose logits are
        computed (all positions when None: logits then have shape (B, T, vocab))."""
        a, g = self.adapter, self.graph
        b, t = input_ids.shape
        h, d = a.n_heads, a.d_model
        if patch is not None and torch.is_grad_enabled():
            raise RuntimeError("edge patching is for evaluation; run it under torch.no_grad()")
        ctx = a.context(attention_mask)

        need_outputs = record or patch is not None
        outputs = None
        if need_outputs:
            dtype = next(a.model.parameters()).dtype
            outputs = torch.zeros(b, t, g.n_forward, d, dtype=dtype, device=input_ids.device)
        if patch is not None:
            drop = 1.0 - patch.keep.to(outputs.dtype)  # (B|1, F, Bk)
            valid = attention_mask[:, :, None].to(outputs.dtype)  # (B, T, 1): padding never patched

        def interpolate(z: Tensor, f0: int, f1: int, is_input: bool) -> Tensor:
            if interpolation is None or (interpolation.input_only and not is_input):
                return z
            clean = interpolation.clean[:, :, f0:f1]
            base = interpolation.baseline[:, :, f0:f1]
            target = base + interpolation.alpha * (clean - base)
            target = target.reshape(z.shape)
            if is_input and interpolation.input_only:
                # nothing upstream of the input: the gradient starts here
                return target.requires_grad_()
            return z + (target - z).detach()

        def store(z: Tensor, f0: int, f1: int) -> None:
            # z (B, T, n, d) for forward nodes f0..f1-1
            if outputs is not None:
                outputs[:, :, f0:f1] = z.detach()

        def patched(resid: Tensor, n_up: int, readers: slice) -> Tensor:
            """Reader inputs (B, T, n_readers, d) for a prefix of n_up upstream nodes."""
            diff = (outputs[:, :, :n_up] - patch.baseline[:, :, :n_up]) * valid[..., None]
            dr = drop[:, :n_up, readers]
            correction = torch.einsum("btfd,bfv->btvd", diff, dr.expand(b, -1, -1)) \
                if dr.shape[0] == b else torch.einsum("btfd,fv->btvd", diff, dr[0])
            return resid[:, :, None, :] - correction

        reader_inputs: list[Tensor] = []
        z_in = interpolate(a.embed(input_ids), 0, 1, True)
        store(z_in[:, :, None], 0, 1)
        resid = z_in
        for layer in range(a.n_layers):
            f0 = g.attention_readers_upstream(layer)
            bq = g.qkv_backward(layer, 0, 0)
            if patch is not None:
                x_att = patched(resid, f0, slice(bq, bq + 3 * h)).view(b, t, 3, h, d)
            elif capture:
                x_att = resid[:, :, None, None, :].expand(b, t, 3, h, d)
            else:  # every head reads the same stream: one copy per q/k/v input suffices
                x_att = resid[:, :, None, None, :].expand(b, t, 3, 1, d)
            if capture:
                reader_inputs.append(x_att)
            heads = interpolate(a.attention_heads(layer, x_att, ctx), f0, f0 + h, False)
            store(heads, f0, f0 + h)
            attn_out = heads.sum(2)
            bias = a.attention_bias(layer)
            if bias is not None:
                attn_out = attn_out + bias
            mlp_resid = resid if a.parallel_attn_mlp else resid + attn_out
            n_up = g.mlp_readers_upstream(layer)
            if patch is not None:
                mb = g.mlp_backward(layer)
                x_mlp = patched(mlp_resid, n_up, slice(mb, mb + 1))[:, :, 0]
            else:
                x_mlp = mlp_resid
            if capture:
                # a distinct tensor so its gradient is the MLP's own input gradient
                x_mlp = x_mlp.view_as(x_mlp)
                reader_inputs.append(x_mlp)
            mlp_out = interpolate(a.mlp(layer, x_mlp), f0 + h, f0 + h + 1, False)
            store(mlp_out[:, :, None], f0 + h, f0 + h + 1)
            resid = mlp_resid + mlp_out if not a.parallel_attn_mlp else resid + attn_out + mlp_out
        if patch is not None:
            x_log = patched(resid, g.n_forward, slice(g.logits_backward, g.logits_backward + 1))
            x_log = x_log[:, :, 0]
        else:
            x_log = resid
        if capture:
            x_log = x_log.view_as(x_log)
            reader_inputs.append(x_log)
        selected = x_log if logit_mask is None else x_log[logit_mask]
        logits = a.unembed(selected)
        return RunOutput(logits=logits, outputs=outputs if record else None,
                         reader_inputs=reader_inputs if capture else None)
