"""One forward pass through the residual-stream view, with the three things attribution and
evaluation need on top of a plain forward:

- **record** every forward node's output (B, T, F, d);
- **patch edges**: reader v's input becomes ``resid - sum_u (1 - keep[u, v]) * (z_u - z'_u)``,
  i.e. edge u->v carries the baseline activation z'_u instead of z_u (METHOD §1, §3); ``keep`` may
  differ per sample, so a batch can evaluate a different circuit for every sample;
- **capture reader inputs** so that one backward pass gives dM/d(in_v) for every reader v, per
  sample (turned into those gradients by :mod:`cud.circuits.gradients`);
- **interpolate** node outputs: each node's output takes the value ``z'_u + alpha (z_u - z'_u)``
  while gradients flow through the node's own computation (straight-through), for EAP-IG over
  activations; or replace only the input node's output (EAP-IG over inputs).

Capturing comes in two ways. *Shared* (the default whenever the adapter writes its attention norm
out as a :class:`~cud.models.adapters.base.ReaderNorm`): the heads of a layer read one normalised
stream, projected once for all heads as the model itself does, and the pass keeps the heads'
q, k, v (before rotary); each head's own input gradient is derived from their gradients
afterwards. *Copies*: every head's q, k and v input is its own copy of the stream, normalised
separately, and autograd gives each copy's gradient directly; simple, and several times slower
(the norm and its backward run on 3 H copies). Both give the same gradients (tested).

The runner knows graph indices, never module names: those stay in the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from cud.circuits.graph import Graph
from cud.models.adapters.base import ResidualAdapter


@dataclass
class EdgePatch:
    """Which edges keep their clean value. ``keep``: (B or 1, F, Bk) float (1 = clean, 0 =
    patched). ``baseline``: (B or 1, T or 1, F, d) activations z'_u carried by patched edges."""

    keep: Tensor
    baseline: Tensor


@dataclass
class Interpolation:
    """Node outputs set to ``baseline + alpha * (clean - baseline)``. ``clean``: (B, T, F, d);
    ``baseline``: broadcastable to it. ``input_only``: only the input node (EAP-IG over inputs).
    ``group``: only the forward nodes group[0]..group[1]-1 (one node group: the input, a
    layer's heads or a layer's MLP), every other node clean."""

    clean: Tensor
    baseline: Tensor
    alpha: float
    input_only: bool = False
    group: tuple[int, int] | None = None
    #: (baseline sum, clean sum - baseline sum) of node groups; shared by :meth:`at`'s copies
    _sums: dict = field(default_factory=dict, repr=False, compare=False)

    def at(self, alpha: float, group: tuple[int, int] | None = None) -> "Interpolation":
        """The same path at another ``alpha`` (and ``group``); the sums are computed once."""
        return replace(self, alpha=alpha, group=group)

    def moves(self, f0: int, f1: int, is_input: bool) -> bool:
        """Whether the node group f0..f1-1 is interpolated."""
        if self.input_only:
            return is_input
        return self.group is None or self.group == (f0, f1)

    def target(self, f0: int, f1: int) -> Tensor:
        """(B, T, f1 - f0, d): the interpolated outputs of forward nodes f0..f1-1."""
        base = self.baseline[:, :, f0:f1]
        return base + self.alpha * (self.clean[:, :, f0:f1] - base)

    def target_sum(self, f0: int, f1: int) -> Tensor:
        """(B, T, d): the sum of the interpolated outputs of forward nodes f0..f1-1."""
        if (f0, f1) not in self._sums:
            base = self.baseline[:, :, f0:f1].sum(2)
            self._sums[f0, f1] = base, self.clean[:, :, f0:f1].sum(2) - base
        base, span = self._sums[f0, f1]
        return base + self.alpha * span


@dataclass
class ReaderCapture:
    """The tensors of one gradient pass at which dM/d(reader input) is read.

    Shared capture (``qkv`` set): the heads of layer l read the stream ``stream[l]`` (B, T, d,
    detached) and ``qkv[l]`` are their q, k, v before rotary, each (B, T, H, e). Copies capture
    (``attention`` set): ``attention[l]`` (B, T, 3, H, d) are the heads' own input copies.
    ``mlp[l]`` (B, T, d) and ``logits`` (B, T, d) are the other readers' inputs.
    """

    mlp: list[Tensor]
    logits: Tensor
    attention: list[Tensor] | None = None
    stream: list[Tensor] | None = None
    qkv: list[tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def shared(self) -> bool:
        return self.qkv is not None

    def tensors(self) -> list[Tensor]:
        """Every captured tensor a gradient is asked of: per layer the attention's (q, k, v or
        the copies), the MLP's; then the logits'."""
        attention = self.qkv if self.shared else [(x,) for x in self.attention]
        return [x for att, mlp in zip(attention, self.mlp) for x in (*att, mlp)] + [self.logits]


@dataclass
class RunOutput:
    logits: Tensor                       # (N, vocab) at the selected positions
    outputs: Tensor | None = None        # (B, T, F, d) recorded node outputs
    capture: ReaderCapture | None = None


class _Patcher:
    """Reader inputs of a patched run, built from the differences z_u - z'_u of the nodes
    computed so far (0 on padding: padding is never patched).

    A reader's input is either ``resid - sum_u drop[u, v] (z_u - z'_u)`` or, equivalently,
    ``base + sum_u keep[u, v] (z_u - z'_u)`` where ``base`` is the stream with every edge patched;
    each sample takes, for each group of readers, the form with fewer parent nodes to sum over,
    so an empty circuit reads ``base`` itself, not ``resid`` minus every difference, which
    would carry that sum's rounding into the faithfulness denominator. A sparse circuit
    costs a handful of nodes per layer, a nearly full graph too, and a reader group with nothing
    to sum reads one stream shared by all its readers.
    """

    def __init__(self, patch: EdgePatch, attention_mask: Tensor, n_forward: int, d: int,
                 dtype: torch.dtype):
        b, t = attention_mask.shape
        self.keep = patch.keep.to(dtype)
        self.drop = 1.0 - self.keep
        self.baseline = patch.baseline
        self.valid = attention_mask[:, :, None, None]
        # (B, F, T, d): a node's differences are contiguous, so a prefix of nodes is one view
        self.diff = torch.zeros(b, n_forward, t, d, dtype=dtype, device=attention_mask.device)

    def add(self, z: Tensor, f0: int) -> Tensor:
        """Record nodes f0.. with outputs ``z`` (B, T, n, d); returns the sum of their outputs
        as patched edges carry them (z' on real tokens, z on padding), (B, T, d)."""
        n = z.shape[2]
        patched = torch.where(self.valid, self.baseline[:, :, f0:f0 + n], z)
        self.diff[:, f0:f0 + n] = (z - patched).transpose(1, 2)
        return patched.sum(2)

    def inputs(self, resid: Tensor, base: Tensor, n_up: int, readers: slice) -> Tensor:
        """Inputs of the readers ``readers`` (backward indices) fed by the first ``n_up``
        nodes: (B, T, V, d), or (B, T, d) when every one of them reads the same stream."""
        drop = self.drop[:, :n_up, readers]
        keep = self.keep[:, :n_up, readers]
        nonzero_drop, nonzero_keep = drop.ne(0).any(2), keep.ne(0).any(2)  # (B or 1, n_up)
        # each sample sums over the fewer nodes (ties: from the clean stream)
        from_base = nonzero_keep.sum(1) < nonzero_drop.sum(1)
        rows = torch.where(from_base[:, None], nonzero_keep, nonzero_drop).any(0)
        rows = rows.nonzero()[:, 0]
        start = resid
        if from_base.any():
            start = torch.where(from_base[:, None, None], base, resid)
        if len(rows) == 0:
            return start
        coef = torch.where(from_base[:, None, None], keep, -drop)
        b, _, t, d = self.diff.shape
        if len(rows) == n_up:
            diff = self.diff[:, :n_up]
        else:
            diff, coef = self.diff[:, rows], coef[:, rows]
        coef = coef.expand(b, -1, -1)
        v = coef.shape[2]
        correction = torch.bmm(coef.transpose(1, 2), diff.reshape(b, len(rows), t * d))
        return start[:, :, None] + correction.view(b, v, t, d).transpose(1, 2)

    def input(self, resid: Tensor, base: Tensor, n_up: int, reader: int) -> Tensor:
        """(B, T, d): the input of the single reader ``reader`` (an MLP, the logits)."""
        x = self.inputs(resid, base, n_up, slice(reader, reader + 1))
        return x[:, :, 0] if x.dim() == 4 else x


class ResidualRunner:
    def __init__(self, adapter: ResidualAdapter, graph: Graph | None = None, *,
                 copies: bool | None = None):
        """``copies``: capture every head's input as its own copy (see the module docstring);
        by default only when the adapter does not write out every layer's attention norm."""
        self.adapter = adapter
        self.graph = graph or Graph.from_adapter(adapter)
        if copies is None:
            copies = any(adapter.reader_norm(layer) is None for layer in range(adapter.n_layers))
        self.copies = copies

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
        if capture and patch is not None:
            raise ValueError("capture is for gradient passes, not patched ones")
        ctx = a.context(attention_mask)
        dtype = next(a.model.parameters()).dtype
        shared = capture and not self.copies

        outputs = None
        if record:
            outputs = torch.zeros(b, t, g.n_forward, d, dtype=dtype, device=input_ids.device)
        patcher = _Patcher(patch, attention_mask, g.n_forward, d, dtype) if patch else None

        def interpolate(z: Tensor, f0: int, f1: int, is_input: bool, summed: bool = False
                        ) -> Tensor:
            """z's value becomes the interpolation target; its gradient stays z's. With
            ``summed`` (or a single node), z (B, T, d) is the sum of nodes f0..f1-1 and takes
            the sum of their targets."""
            if interpolation is None or not interpolation.moves(f0, f1, is_input):
                return z
            if summed or f1 - f0 == 1:
                target = interpolation.target_sum(f0, f1).expand_as(z)
            else:
                target = interpolation.target(f0, f1)
            if is_input and interpolation.input_only:
                # nothing upstream of the input: the gradient starts here
                return target.requires_grad_()
            return z + (target - z).detach()

        def emit(z: Tensor, f0: int) -> Tensor | None:
            """Nodes f0.. produced ``z`` (B, T, n, d); returns their patched sum when patching."""
            if outputs is not None:
                outputs[:, :, f0:f0 + z.shape[2]] = z.detach()
            return patcher.add(z, f0) if patcher is not None else None

        cap_attention, cap_stream, cap_qkv, cap_mlp = [], [], [], []
        z_in = interpolate(a.embed(input_ids), 0, 1, True)
        base = emit(z_in[:, :, None], 0)  # the all-patched stream, when patching
        resid = z_in
        for layer in range(a.n_layers):
            f0 = g.attention_readers_upstream(layer)
            bq = g.qkv_backward(layer, 0, 0)
            base_attn = None
            if shared:
                cap_stream.append(resid.detach())
                qkv = a.project_qkv(layer, a.attention_norm(layer)(resid))
                cap_qkv.append(qkv)
                o = a.attend_qkv(layer, qkv, ctx)
                attn_out = interpolate(a.attention_output(layer, o), f0, f0 + h, False,
                                       summed=True)
                if outputs is not None:  # the heads one by one, only to record them
                    with torch.no_grad():
                        heads = (o.detach() @ a.output_weight(layer)).transpose(1, 2)
                        emit(interpolate(heads, f0, f0 + h, False), f0)
            else:
                if patcher is not None:
                    x_att = patcher.inputs(resid, base, f0, slice(bq, bq + 3 * h))
                    if x_att.dim() == 4:
                        x_att = x_att.view(b, t, 3, h, d)
                elif capture:
                    x_att = resid[:, :, None, None, :].expand(b, t, 3, h, d)
                    cap_attention.append(x_att)
                else:
                    x_att = resid
                heads = interpolate(a.attention_heads(layer, x_att, ctx), f0, f0 + h, False)
                base_attn = emit(heads, f0)
                attn_out = heads.sum(2)
            bias = a.attention_bias(layer)
            if bias is not None:
                attn_out = attn_out + bias
                if base_attn is not None:
                    base_attn = base_attn + bias
            mlp_resid = resid if a.parallel_attn_mlp else resid + attn_out
            if patcher is not None:
                mlp_base = base if a.parallel_attn_mlp else base + base_attn
                x_mlp = patcher.input(mlp_resid, mlp_base, g.mlp_readers_upstream(layer),
                                      g.mlp_backward(layer))
            else:
                x_mlp = mlp_resid
            if capture:
                # a distinct tensor so its gradient is the MLP's own input gradient
                x_mlp = x_mlp.view_as(x_mlp)
                cap_mlp.append(x_mlp)
            mlp_out = interpolate(a.mlp(layer, x_mlp), f0 + h, f0 + h + 1, False)
            base_mlp = emit(mlp_out[:, :, None], f0 + h)
            if a.parallel_attn_mlp:
                resid = resid + attn_out + mlp_out
                if patcher is not None:
                    base = base + base_attn + base_mlp
            else:
                resid = mlp_resid + mlp_out
                if patcher is not None:
                    base = mlp_base + base_mlp
        if patcher is not None:
            x_log = patcher.input(resid, base, g.n_forward, g.logits_backward)
        else:
            x_log = resid
        captured = None
        if capture:
            x_log = x_log.view_as(x_log)
            captured = ReaderCapture(mlp=cap_mlp, logits=x_log,
                                     attention=None if shared else cap_attention,
                                     stream=cap_stream if shared else None,
                                     qkv=cap_qkv if shared else None)
        selected = x_log if logit_mask is None else x_log[logit_mask]
        logits = a.unembed(selected)
        return RunOutput(logits=logits, outputs=outputs, capture=captured)
