"""Batched greedy decoding with a key-value cache, each row stopping at its own end.

The prompt is run once (left-padded, positions counted from each row's first real token, as
``generate`` does); every later step feeds one token per row and reads the logits of that position
only. A row stops at an end-of-sequence token or at its own token budget, and is then dropped from
the batch (its cache rows too), so a batch costs what its longest-running rows need, not what
its longest budget allows times every row.

:func:`cached_forward` is the one call both this module and :mod:`cud.models.variants` use: it
passes the cache under the keyword the model's ``forward`` names (``cache`` in transformers 5,
``past_key_values`` before) and asks for the logits of chosen positions only.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor

_CACHE_KEYWORD: dict[type, str | None] = {}


def cache_keyword(model: torch.nn.Module) -> str | None:
    """The keyword under which ``model.forward`` takes a key-value cache (None: it takes none)."""
    cls = type(model)
    if cls not in _CACHE_KEYWORD:
        params = inspect.signature(model.forward).parameters
        _CACHE_KEYWORD[cls] = next((k for k in ("cache", "past_key_values") if k in params), None)
    return _CACHE_KEYWORD[cls]


def new_cache(model: torch.nn.Module):
    """An empty dynamic cache for ``model`` (per-layer kinds, e.g. sliding windows, from its
    config)."""
    from transformers import DynamicCache
    return DynamicCache(config=model.config)


def cached_forward(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   position_ids: Tensor, cache, logits_to_keep: int | Tensor) -> Tensor:
    """Logits of ``model`` at the kept positions, extending ``cache`` in place.

    ``attention_mask`` covers the cached tokens and the new ones; ``logits_to_keep`` is an int
    (the last n positions: (B, n, V) logits) or a (B, T) bool mask (packed (N, V) logits)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=logits_to_keep, **{cache_keyword(model): cache})
    return out.logits


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Every end-of-sequence id the tokenizer or the model's generation config names."""
    ids: set[int] = set()
    for t in (getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if t is not None:
            ids.update(t if isinstance(t, (list, tuple)) else [t])
    return ids


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(input ids, attention mask, position ids) of left-padded prompts; positions count from
    each row's first real token (padding positions read 1, as ``generate`` sets them)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                  budgets: Sequence[int], *, pad_id: int, eos_ids: set[int],
                  device: torch.device | str = "cpu") -> list[list[int]]:
    """The greedy continuation of each prompt (one batch): at most ``budgets[i]`` new tokens,
    ending before the first end-of-sequence token (which is not returned).

    Models whose ``forward`` takes no cache are decoded by rerunning the whole sequence each step
    (same tokens, slower)."""
    if len(prompts) != len(budgets):
        raise ValueError("one budget per prompt")
    out: list[list[int]] = [[] for _ in prompts]
    active = [i for i, b in enumerate(budgets) if b > 0]
    if not active:
        return out
    ids, mask, positions = left_padded([prompts[i] for i in active], pad_id, device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    budget = torch.tensor([budgets[i] for i in active], device=device)
    rows = torch.tensor(active, device=device)   # which prompt each batch row is
    cached = cache_keyword(model) is not None
    cache = new_cache(model) if cached else None
    if cached:
        logits = cached_forward(model, ids, mask, positions, cache, 1)[:, -1]
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    n = 0
    while True:
        nxt = logits.float().argmax(-1)
        n += 1
        ended = torch.isin(nxt, eos)
        for r, t, e in zip(rows.tolist(), nxt.tolist(), ended.tolist()):
            if not e:
                out[r].append(t)
        keep = ~ended & (budget > n)
        if not bool(keep.any()):
            return out
        if not bool(keep.all()):
            idx = keep.nonzero()[:, 0]
            rows, budget, nxt = rows[idx], budget[idx], nxt[idx]
            mask, positions = mask[idx], positions[idx]
            if cached:
                cache.batch_select_indices(idx)
            else:
                ids = ids[idx]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], 1)
        positions = positions[:, -1:] + 1 if cached else \
            torch.cat([positions, positions[:, -1:] + 1], 1)
        if cached:
            logits = cached_forward(model, nxt[:, None], mask, positions, cache, 1)[:, -1]
        else:
            ids = torch.cat([ids, nxt[:, None]], 1)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
