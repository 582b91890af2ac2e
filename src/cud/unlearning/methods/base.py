"""What an unlearning method is: a loss over a forget batch (and a retain batch), nothing else.

The shared loop (:mod:`cud.unlearning.loop`) owns the optimiser, schedule, batching, devices and
evaluation; a method only says what to minimise and, where it differs from "every parameter",
which parameters move. Methods that compare with the original model get a frozen copy of it,
``reference``, before training starts.

Notation (METHOD §5): NLL_f, NLL_r = mean answer NLL per token of a forget / retain sample,
averaged over the batch; log π(y|x) = sum of the answer tokens' log-probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import Tensor

from cud.data.encoding import Batch
from cud.models.answers import answer_nll


def sample_mean(values: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of per-sample ``values`` (B,); with ``weights`` (B,) the weighted mean
    (1/B)·Σ w_i·values_i, so each sample's gradient is scaled by exactly w_i (the ``reweight``
    strategy's weights have mean 1 over the forget set). Without weights: ``values.mean()``,
    the same operation as before weights existed."""
    if weights is None:
        return values.mean()
    return (weights.to(values.dtype) * values).mean()


@dataclass
class UnlearningMethod:
    """Base class. Subclasses are dataclasses whose fields are the method's hyperparameters."""

    #: registry name (``--method``)
    name: ClassVar[str] = ""
    #: needs a frozen copy of the model before unlearning
    needs_reference: ClassVar[bool] = False
    #: reads a retain batch each step
    uses_retain: ClassVar[bool] = False

    def setup(self, model: torch.nn.Module, reference: torch.nn.Module | None) -> None:
        """Called once before training (e.g. RMU draws its random direction here)."""
        self.reference = reference

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters the optimiser moves. Default: all that require a gradient."""
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model: torch.nn.Module, forget: Batch, retain: Batch | None
             ) -> tuple[Tensor, dict[str, float]]:
        """The scalar to minimise on one step and a few numbers to log."""
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        return asdict(self)

    # helpers shared by several methods
    def retain_term(self, model: torch.nn.Module, retain: Batch | None, alpha: float
                    ) -> tuple[Tensor, dict[str, float]]:
        """α · NLL_r, or 0 when there is no retain batch or α = 0."""
        if retain is None or alpha == 0:
            return torch.zeros((), device=next(model.parameters()).device), {}
        nll_r = answer_nll(model, retain).mean()
        return alpha * nll_r, {"nll_retain": float(nll_r.detach())}
