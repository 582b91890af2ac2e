"""Ablations: the activations z'_u that a patched edge carries instead of z_u (METHOD §2 calls
them baseline activations; they are also where the integrated-gradients path starts).

- ``zero`` (the reference code): z' = 0.
- ``mean``: each node's mean output over every real token of a reference set (e.g. the retain
  set), one d-vector per node, the same at every position (ours: samples differ in length, so a
  position-wise mean would be undefined for the longer ones).
- ``corrupt``: the node outputs on a corrupted prompt of the same length: every question token is
  replaced by a random non-special token. The random draw is seeded by the sample's id, so a
  sample gets the same corruption whichever batch it is in. With ``draws`` > 1, the mean node
  outputs over that many corrupted prompts.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch import Tensor

from cud.circuits.runner import ResidualRunner
from cud.data.encoding import Batch
from cud.errors import ConfigError

ABLATIONS = ("zero", "mean", "corrupt")


class Ablation:
    """Gives z' for a batch: a tensor broadcastable to (B, T, F, d). ``token_input``: the
    ``input`` node is the token embedding alone (the reference convention), not token +
    position embeddings."""

    name = ""

    def for_batch(self, runner: ResidualRunner, batch: Batch, token_input: bool = False
                  ) -> Tensor:
        raise NotImplementedError


class ZeroAblation(Ablation):
    name = "zero"

    def for_batch(self, runner, batch, token_input=False):
        g, a = runner.graph, runner.adapter
        p = next(a.model.parameters())
        return torch.zeros(1, 1, g.n_forward, a.d_model, dtype=p.dtype, device=p.device)


class MeanAblation(Ablation):
    name = "mean"

    def __init__(self, mean: Tensor, token_input: bool = False):
        self.mean = mean  # (F, d)
        self.token_input = token_input

    @classmethod
    def fit(cls, runner: ResidualRunner, reference: Iterable[Batch], token_input: bool = False
            ) -> "MeanAblation":
        """Mean node outputs over every real token of the ``reference`` batches."""
        total, count = None, 0
        device = next(runner.adapter.model.parameters()).device
        with torch.no_grad():
            for batch in reference:
                batch = batch.to(device)
                out = runner.run(batch.input_ids, batch.attention_mask, record=True,
                                 logit_mask=torch.zeros_like(batch.attention_mask),
                                 token_input=token_input).outputs
                real = out[batch.attention_mask].double()  # (N, F, d)
                total = real.sum(0) if total is None else total + real.sum(0)
                count += real.shape[0]
        if not count:
            raise ConfigError("the mean ablation needs a non-empty reference set")
        return cls((total / count).to(out.dtype), token_input)

    def for_batch(self, runner, batch, token_input=False):
        if token_input != self.token_input:
            raise ConfigError("this mean ablation was fitted for the other convention of the "
                              "input node")
        return self.mean[None, None]


def sample_seed(sample_id: str, seed: int = 0, draw: int = 0) -> int:
    """The random seed of corrupted prompt ``draw`` of a sample: its id and the run's ``seed``
    alone decide it (not the batch it lands in). Draw 0 of seed s and draw 0 of seed s + 1 are
    independent, so a rerun with another seed is an independent measurement (test-retest)."""
    key = f"{seed}:{sample_id}" if draw == 0 else f"{seed}.{draw}:{sample_id}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little")


def corrupt_input_ids(batch: Batch, vocab_size: int, special_ids: Iterable[int] = (),
                      seed: int = 0, draw: int = 0) -> Tensor:
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
        gen = torch.Generator().manual_seed(sample_seed(sample_id, seed, draw))
        pick = torch.randint(len(pool), (len(where),), generator=gen)
        ids[i, where.to(ids.device)] = pool[pick].to(ids.device)
    return ids


class CorruptAblation(Ablation):
    """Node outputs on corrupted prompts; with ``draws`` > 1 the mean over that many
    independently corrupted prompts of each sample (one no-gradient pass each), which makes the
    ablation, and so the circuit, an estimate of one well-defined quantity rather than one
    random draw."""

    name = "corrupt"

    def __init__(self, tokenizer, seed: int = 0, draws: int = 1):
        if draws < 1:
            raise ConfigError(f"draws must be at least 1, got {draws}")
        self.vocab_size = len(tokenizer)
        self.special_ids = list(getattr(tokenizer, "all_special_ids", []) or [])
        self.seed, self.draws = seed, draws

    def for_batch(self, runner, batch, token_input=False):
        vocab = min(self.vocab_size, runner.adapter.model.get_input_embeddings().weight.shape[0])
        total = None
        with torch.no_grad():
            for draw in range(self.draws):
                ids = corrupt_input_ids(batch, vocab, self.special_ids, self.seed, draw)
                out = runner.run(ids, batch.attention_mask, record=True,
                                 logit_mask=torch.zeros_like(batch.attention_mask),
                                 token_input=token_input).outputs
                if self.draws == 1:
                    return out
                total = out.float() if total is None else total.add_(out)
        return total.div_(self.draws).to(out.dtype)


def make_ablation(name: str, *, tokenizer=None, runner: ResidualRunner | None = None,
                  reference: Iterable[Batch] | None = None, seed: int = 0, draws: int = 1,
                  token_input: bool = False) -> Ablation:
    if name == "zero":
        return ZeroAblation()
    if name == "corrupt":
        if tokenizer is None:
            raise ConfigError("the corrupt ablation needs the tokenizer")
        return CorruptAblation(tokenizer, seed, draws)
    if name == "mean":
        if reference is None or runner is None:
            raise ConfigError("the mean ablation needs a reference set (e.g. --reference retain.json)")
        return MeanAblation.fit(runner, reference, token_input)
    raise ConfigError(f"unknown ablation '{name}' (choose from {', '.join(ABLATIONS)})")
