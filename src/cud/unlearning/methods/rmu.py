"""RMU (representation misdirection): scramble the forget set's hidden states at one layer by
steering them to a fixed random direction, keep the retain set's where the frozen model has them,
and let only a few MLPs up to that layer move."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cud.data.encoding import Batch
from cud.unlearning.methods.base import UnlearningMethod
from cud.models.answers import prediction_mask

#: the MLP block of decoder layer N in every supported family (llama ``model.layers.N.mlp``,
#: gpt2 ``transformer.h.N.mlp``, gpt_neox ``gpt_neox.layers.N.mlp``)
_MLP_NAME = re.compile(r"(?:^|\.)(\d+)\.mlp$")


def rmu_loss(h_forget: Tensor, h_retain: Tensor | None, h_retain_frozen: Tensor | None,
             control: Tensor, alpha: float, weights: Tensor | None = None) -> Tensor:
    """MSE(h_f, c·u) + α·MSE(h_r, h_r^frozen). ``h_*`` (N, d) hidden states at the chosen
    positions; ``control`` (d,) is c·u. ``weights`` (N,): each forget position weighted by its
    sample's weight (the ``reweight`` strategy), the mean then of w·squared error."""
    if weights is None:
        loss = F.mse_loss(h_forget, control.expand_as(h_forget))
    else:
        squared = (h_forget - control.expand_as(h_forget)) ** 2
        loss = (weights.to(squared.dtype)[:, None] * squared).mean()
    if h_retain is not None and alpha:
        loss = loss + alpha * F.mse_loss(h_retain, h_retain_frozen)
    return loss


def mlp_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> its MLP module."""
    found = {}
    for name, module in model.named_modules():
        m = _MLP_NAME.search(name)
        if m:
            found.setdefault(int(m.group(1)), module)
    return found


def num_layers(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"))


@dataclass
class RMU(UnlearningMethod):
    """Representation misdirection for unlearning (Li et al. 2024, WMDP).

    ``layer``: the decoder layer whose output is steered (0-based). ``None`` picks the same
    relative depth as the reference setup (layer 10 of Llama-3.2-1B's 16): round(L·10/16).
    ``update_layers``: how many layers' MLPs up to and including ``layer`` move (3, as in RMU).
    ``coefficient``: the steering coefficient c; ``None`` (ours) sets it to ``auto_scale`` times
    the mean norm of the frozen model's hidden states at that layer on the first forget batch, so
    one setting suits models whose residual norms differ by orders of magnitude.
    ``positions`` (ours): where hidden states are steered and kept: ``answer`` (default: the
    positions that predict answer tokens, which the answer's likelihood depends on), ``sample``
    (those and the question's tokens) or ``all`` (every real token, as RMU on raw text).
    """

    name = "rmu"
    needs_reference = True
    uses_retain = True
    layer: int | None = None
    coefficient: float | None = 100.0
    alpha: float = 1.0
    update_layers: int = 3
    auto_scale: float = 2.0
    positions: str = "answer"
    seed: int = 0

    def hyperparameters(self) -> dict:
        return {"layer": self.layer, "coefficient": self.coefficient, "alpha": self.alpha,
                "update_layers": self.update_layers, "positions": self.positions,
                "auto_scale": self.auto_scale,
                "seed": self.seed}

    def resolved_layer(self, model) -> int:
        n = num_layers(model)
        layer = round(n * 10 / 16) if self.layer is None else self.layer
        if not 0 <= layer < n:
            raise ValueError(f"RMU layer {layer} out of range for a model of {n} layers")
        return layer

    def setup(self, model, reference):
        super().setup(model, reference)
        self._layer = self.resolved_layer(model)
        d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
        gen = torch.Generator().manual_seed(self.seed)
        u = torch.rand(d, generator=gen)  # as the reference code: uniform [0, 1), normalised
        p = next(model.parameters())
        self._direction = (u / u.norm()).to(p.device, torch.float32)
        self._control = None if self.coefficient is None else self.coefficient * self._direction
        self.resolved_coefficient = self.coefficient

    def trainable_parameters(self, model):
        layer = self.resolved_layer(model)
        mlps = mlp_modules(model)
        chosen = [i for i in range(layer - self.update_layers + 1, layer + 1) if i in mlps]
        if not chosen:
            raise ValueError("RMU found no MLP modules to update in this model")
        return [p for i in chosen for p in mlps[i].parameters()]

    def _hidden(self, model, batch: Batch) -> Tensor:
        """(N, d) output of decoder layer ``layer`` at the answer-predicting positions."""
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                    output_hidden_states=True, use_cache=False, logits_to_keep=1)
        # hidden_states[0] is the embedding output, hidden_states[l + 1] the output of layer l
        return out.hidden_states[self._layer + 1][self._positions(batch)].float()

    def _positions(self, batch: Batch) -> Tensor:
        if self.positions == "answer":
            return prediction_mask(batch)
        if self.positions == "sample":
            return prediction_mask(batch) | batch.question_mask
        if self.positions == "all":
            return batch.attention_mask
        raise ValueError(f"RMU positions must be answer, sample or all, got '{self.positions}'")

    def loss(self, model, forget, retain):
        if self._control is None:  # automatic coefficient, fixed at the first batch
            with torch.no_grad():
                norm = float(self._hidden(self.reference, forget).norm(dim=-1).mean())
            self.resolved_coefficient = self.auto_scale * norm
            self._control = self.resolved_coefficient * self._direction
        h_f = self._hidden(model, forget)
        h_r = h_r0 = None
        if retain is not None and self.alpha:
            h_r = self._hidden(model, retain)
            with torch.no_grad():
                h_r0 = self._hidden(self.reference, retain)
        weights = None
        if forget.weights is not None:  # each steered position weighted by its sample's weight
            rows = self._positions(forget).nonzero()[:, 0]
            weights = forget.weights[rows]
        loss = rmu_loss(h_f, h_r, h_r0, self._control, self.alpha, weights)
        logs = {"steer_mse": float(F.mse_loss(h_f, self._control.expand_as(h_f)).detach()),
                "coefficient": float(self.resolved_coefficient)}
        if h_r is not None:
            logs["retain_mse"] = float(F.mse_loss(h_r, h_r0).detach())
        return loss, logs
