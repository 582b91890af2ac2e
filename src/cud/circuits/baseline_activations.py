"""Baseline activations z'_u that a patched edge carries instead of z_u (METHOD §2).

- ``zero`` (the reference code): z' = 0.
- ``mean``: each node's mean output over every real token of a reference set (e.g. the retain
  set), one d-vector per node, the same at every position (ours: samples differ in length, so a
  position-wise mean would be undefined for the longer ones).
- ``corrupt``: the node outputs on a corrupted prompt of the same length: every question token is
  replaced by a random non-special token. The random draw is seeded by the sample's id, so a
  sample gets the same corruption whichever batch it is in.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch import Tensor

from cud.circuits.runner import ResidualRunner
from cud.data.encoding import Batch
from cud.errors import ConfigError

BASELINES = ("zero", "mean", "corrupt")


class BaselineActivations:
    """Gives z' for a batch: a tensor broadcastable to (B, T, F, d)."""

    name = ""

    def for_batch(self, runner: ResidualRunner, batch: Batch) -> Tensor:
        raise NotImplementedError


class ZeroBaseline(BaselineActivations):
    name = "zero"

    def for_batch(self, runner, batch):
        g, a = runner.graph, runner.adapter
        p = next(a.model.parameters())
        return torch.zeros(1, 1, g.n_forward, a.d_model, dtype=p.dtype, device=p.device)


class MeanBaseline(BaselineActivations):
    name = "mean"

    def __init__(self, mean: Tensor):
        self.mean = mean  # (F, d)

    @classmethod
    def fit(cls, runner: ResidualRunner, reference: Iterable[Batch]) -> "MeanBaseline":
        """Mean node outputs over every real token of the ``reference`` batches."""
        total, count = None, 0
        device = next(runner.adapter.model.parameters()).device
        with torch.no_grad():
            for batch in reference:
                batch = batch.to(device)
                out = runner.run(batch.input_ids, batch.attention_mask, record=True,
                                 logit_mask=torch.zeros_like(batch.attention_mask)).outputs
                real = out[batch.attention_mask].double()  # (N, F, d)
                total = real.sum(0) if total is None else total + real.sum(0)
                count += real.shape[0]
        if not count:
            raise ConfigError("the mean baseline needs a non-empty reference set")
        return cls((total / count).to(out.dtype))

    def for_batch(self, runner, batch):
        return self.mean[None, None]


def sample_seed(sample_id: str, seed: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def corrupt_input_ids(batch: Batch, vocab_size: int, special_ids: Iterable[int] = (),
                      seed: int = 0) -> Tensor:
    """(B, T) ids with each sample's question tokens replaced by random non-special tokens."""
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    pool = allowed.nonzero()[:, 0]
    ids = batch.input_ids.clone()
    for i, sample_id in enumerate(batch.ids):
        where = batch.question_mask[i].nonzero()[:, 0]
        if not len(where):
            continue
        gen = torch.Generator().manual_seed(sample_seed(sample_id, seed))
        pick = torch.randint(len(pool), (len(where),), generator=gen)
        ids[i, where.to(ids.device)] = pool[pick].to(ids.device)
    return ids


class CorruptBaseline(BaselineActivations):
    name = "corrupt"

    def __init__(self, tokenizer, seed: int = 0):
        self.vocab_size = len(tokenizer)
        self.special_ids = list(getattr(tokenizer, "all_special_ids", []) or [])
        self.seed = seed

    def for_batch(self, runner, batch):
        vocab = min(self.vocab_size, runner.adapter.model.get_input_embeddings().weight.shape[0])
        ids = corrupt_input_ids(batch, vocab, self.special_ids, self.seed)
        with torch.no_grad():
            return runner.run(ids, batch.attention_mask, record=True,
                              logit_mask=torch.zeros_like(batch.attention_mask)).outputs


def make_baseline(name: str, *, tokenizer=None, runner: ResidualRunner | None = None,
                  reference: Iterable[Batch] | None = None, seed: int = 0) -> BaselineActivations:
    if name == "zero":
        return ZeroBaseline()
    if name == "corrupt":
        if tokenizer is None:
            raise ConfigError("the corrupt baseline needs the tokenizer")
        return CorruptBaseline(tokenizer, seed)
    if name == "mean":
        if reference is None or runner is None:
            raise ConfigError("the mean baseline needs a reference set (e.g. --reference retain.json)")
        return MeanBaseline.fit(runner, reference)
    raise ConfigError(f"unknown baseline '{name}' (choose from {', '.join(BASELINES)})")
