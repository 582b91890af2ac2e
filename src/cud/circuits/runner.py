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
    #: the gradient flows through the moved nodes' own computation (cud's convention); False:
    #: their outputs are replaced by constants, the reference code's
    straight_through: bool = True
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
            interpolation: Interpolation | None = None, capture: bool = False,
            token_input: bool = False) -> RunOutput:
        """Forward pass. ``logit_mask`` (B, T) bool picks the positions whose logits are
        computed (all positions when None: logits then have shape (B, T, vocab)).
        ``token_input``: the ``input`` node is the token embedding alone and a model's position
        embeddings a constant of the stream (the reference convention)."""
        if patch is not None and torch.is_grad_enabled():
            raise RuntimeError("edge patching is for evaluation; run it under torch.no_grad()")
        if capture and patch is not None:
            raise ValueError("capture is for gradient passes, not patched ones")
        one = _Pass(self, input_ids, attention_mask, record=record, patch=patch,
                    interpolation=interpolation, capture=capture)
        one.embed(input_ids, token_input)
        for layer in range(self.adapter.n_layers):
            attn_out, base_attn = one.attention(layer)
            one.mlp(layer, attn_out, base_attn)
        return one.readout(logit_mask)


class _Pass:
    """One forward pass of :meth:`ResidualRunner.run`: the residual stream ``resid`` (and, when
    patching, ``base``, the stream with every edge patched) carried layer by layer, with each
    mode's work in its own place: recording and patching in :meth:`emit`, interpolation in
    :meth:`interpolate`, capture in the attention and MLP steps."""

    def __init__(self, runner: ResidualRunner, input_ids: Tensor, attention_mask: Tensor, *,
                 record: bool, patch: EdgePatch | None, interpolation: Interpolation | None,
                 capture: bool):
        self.a, self.g = runner.adapter, runner.graph
        b, t = input_ids.shape
        self.shape = (b, t, self.a.n_heads, self.a.d_model)
        dtype = next(self.a.model.parameters()).dtype
        self.ctx = self.a.context(attention_mask)
        self.interpolation = interpolation
        self.capture = capture
        self.shared = capture and not runner.copies
        self.outputs = torch.zeros(b, t, self.g.n_forward, self.a.d_model, dtype=dtype,
                                   device=input_ids.device) if record else None
        self.patcher = _Patcher(patch, attention_mask, self.g.n_forward, self.a.d_model,
                                dtype) if patch else None
        self.cap_attention, self.cap_stream, self.cap_qkv, self.cap_mlp = [], [], [], []
        self.resid: Tensor | None = None
        self.base: Tensor | None = None   # the all-patched stream, when patching

    # the modes ------------------------------------------------------------------------------
    def interpolate(self, z: Tensor, f0: int, f1: int, is_input: bool, summed: bool = False
                    ) -> Tensor:
        """z's value becomes the interpolation target; its gradient stays z's. With ``summed``
        (or a single node), z (B, T, d) is the sum of nodes f0..f1-1 and takes the sum of their
        targets."""
        path = self.interpolation
        if path is None or not path.moves(f0, f1, is_input):
            return z
        if summed or f1 - f0 == 1:
            target = path.target_sum(f0, f1).expand_as(z)
        else:
            target = path.target(f0, f1)
        if is_input and path.input_only:
            # nothing upstream of the input: the gradient starts here
            return target.requires_grad_()
        if not path.straight_through:
            return target.detach()
        return z + (target - z).detach()

    def emit(self, z: Tensor, f0: int) -> Tensor | None:
        """Nodes f0.. produced ``z`` (B, T, n, d): record them; when patching, return their
        patched sum."""
        if self.outputs is not None:
            self.outputs[:, :, f0:f0 + z.shape[2]] = z.detach()
        return self.patcher.add(z, f0) if self.patcher is not None else None

    # the layers -----------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, token_input: bool = False) -> None:
        positions = self.a.position_embedding(input_ids) if token_input else None
        if positions is None:
            z_in = self.interpolate(self.a.embed(input_ids), 0, 1, True)
            self.base = self.emit(z_in[:, :, None], 0)
            self.resid = z_in
            return
        # the input node is the token embedding; the positions a constant every edge carries
        z_in = self.interpolate(self.a.embed_tokens(input_ids), 0, 1, True)
        base = self.emit(z_in[:, :, None], 0)
        self.base = None if base is None else base + positions
        self.resid = z_in + positions

    def attention(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """(the attention's output added to the stream, its all-patched counterpart or None),
        the output bias included."""
        if self.shared:
            attn_out, base_attn = self._attention_shared(layer), None
        else:
            attn_out, base_attn = self._attention_per_head(layer)
        bias = self.a.attention_bias(layer)
        if bias is not None:
            attn_out = attn_out + bias
            if base_attn is not None:
                base_attn = base_attn + bias
        return attn_out, base_attn

    def _attention_shared(self, layer: int) -> Tensor:
        """Every head reads one normalised stream, projected once (a capture pass)."""
        a, f0 = self.a, self.g.attention_readers_upstream(layer)
        self.cap_stream.append(self.resid.detach())
        qkv = a.project_qkv(layer, a.attention_norm(layer)(self.resid))
        self.cap_qkv.append(qkv)
        o = a.attend_qkv(layer, qkv, self.ctx)
        attn_out = self.interpolate(a.attention_output(layer, o), f0, f0 + a.n_heads, False,
                                    summed=True)
        if self.outputs is not None:  # the heads one by one, only to record them
            with torch.no_grad():
                heads = a.head_outputs(layer, o.detach())
                self.emit(self.interpolate(heads, f0, f0 + a.n_heads, False), f0)
        return attn_out

    def _attention_per_head(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """Every head computed from its own input: patched, captured as copies, or plain."""
        a, g = self.a, self.g
        b, t, h, d = self.shape
        f0, bq = g.attention_readers_upstream(layer), g.qkv_backward(layer, 0, 0)
        if self.patcher is not None:
            x_att = self.patcher.inputs(self.resid, self.base, f0, slice(bq, bq + 3 * h))
            if x_att.dim() == 4:
                x_att = x_att.view(b, t, 3, h, d)
        elif self.capture:
            x_att = self.resid[:, :, None, None, :].expand(b, t, 3, h, d)
            self.cap_attention.append(x_att)
        else:
            x_att = self.resid
        heads = self.interpolate(a.attention_heads(layer, x_att, self.ctx), f0, f0 + h, False)
        base_attn = self.emit(heads, f0)
        return heads.sum(2), base_attn

    def mlp(self, layer: int, attn_out: Tensor, base_attn: Tensor | None) -> None:
        """The MLP of ``layer`` (reading the stream before or after the attention), and the
        stream moved past the layer."""
        a, g, patcher = self.a, self.g, self.patcher
        f_mlp = g.mlp_forward(layer)
        mlp_resid = self.resid if a.parallel_attn_mlp else self.resid + attn_out
        mlp_base = None
        if patcher is not None:
            mlp_base = self.base if a.parallel_attn_mlp else self.base + base_attn
            x_mlp = patcher.input(mlp_resid, mlp_base, g.mlp_readers_upstream(layer),
                                  g.mlp_backward(layer))
        else:
            x_mlp = mlp_resid
        if self.capture:
            # a distinct tensor so its gradient is the MLP's own input gradient
            x_mlp = x_mlp.view_as(x_mlp)
            self.cap_mlp.append(x_mlp)
        mlp_out = self.interpolate(a.mlp(layer, x_mlp), f_mlp, f_mlp + 1, False)
        base_mlp = self.emit(mlp_out[:, :, None], f_mlp)
        if a.parallel_attn_mlp:
            self.resid = self.resid + attn_out + mlp_out
            if patcher is not None:
                self.base = self.base + base_attn + base_mlp
        else:
            self.resid = mlp_resid + mlp_out
            if patcher is not None:
                self.base = mlp_base + base_mlp

    def readout(self, logit_mask: Tensor | None) -> RunOutput:
        g = self.g
        if self.patcher is not None:
            x_log = self.patcher.input(self.resid, self.base, g.n_forward, g.logits_backward)
        else:
            x_log = self.resid
        captured = None
        if self.capture:
            x_log = x_log.view_as(x_log)
            captured = ReaderCapture(mlp=self.cap_mlp, logits=x_log,
                                     attention=None if self.shared else self.cap_attention,
                                     stream=self.cap_stream if self.shared else None,
                                     qkv=self.cap_qkv if self.shared else None)
        selected = x_log if logit_mask is None else x_log[logit_mask]
        return RunOutput(logits=self.a.unembed(selected), outputs=self.outputs,
                         capture=captured)
