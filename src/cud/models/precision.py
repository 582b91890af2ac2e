"""Matrix products in bfloat16 where asked: ``torch.autocast`` on the model's device. The
weights, the optimiser's state and every loss and metric (computed from float32 logits) stay
float32; only the matrix products run in bf16, which CPUs with ``avx512_bf16`` (and GPUs) do
several times faster. Attribution and MRD never use it (see the README).

The autocast weight cache is off: autocast keeps the bf16 copy of each weight until the
outermost autocast block ends, so a block held around training (or an evaluation inside one)
would compute with the weights as they were when the block began, however far the optimiser
had moved them."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def matmul_precision(device: torch.device | str, bf16: bool | None) -> Iterator[None]:
    """bf16 autocast on ``device`` for the block when ``bf16`` is true; nothing otherwise."""
    if not bf16:
        yield
        return
    kind = torch.device(device).type
    with torch.autocast(kind, dtype=torch.bfloat16, cache_enabled=False):
        yield


@contextlib.contextmanager
def evaluation_precision(device: torch.device | str, bf16: bool | None) -> Iterator[None]:
    """bf16 autocast for a block that leaves the weights alone (an evaluation): each weight is
    cast to bf16 once for the whole block (autocast's weight cache on) instead of once per matrix
    product, which is most of a one-token decoding step's cost. The cache is dropped when the
    block ends, also inside an outer :func:`matmul_precision` block (which would otherwise keep
    it, stale, for the training that follows)."""
    if not bf16:
        yield
        return
    kind = torch.device(device).type
    try:
        with torch.autocast(kind, dtype=torch.bfloat16, cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()
