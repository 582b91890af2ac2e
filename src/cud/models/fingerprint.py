"""Which weights a result was computed with: every resumable stage keys its results by the
model's fingerprint, so a folder of another model's (or another fine-tune's) results is refused
rather than mixed in."""

from __future__ import annotations

import hashlib
import json

import torch

from cud.models.loading import LoadedModel


def model_fingerprint(lm: LoadedModel) -> str:
    """Identifies the weights, not the path: a fine-tuned copy of a model has the same config
    but another fingerprint. Config + dtype + a few parameter sums."""
    params = list(lm.model.parameters())
    picks = [params[0], params[len(params) // 2], params[-1]]
    # summed on the CPU, so a driver on the CPU and workers on GPUs agree
    picks = [p.detach().to("cpu", torch.float64) for p in picks]
    sums = [f"{p.sum().item():.6e}/{p.abs().sum().item():.6e}" for p in picks]
    config = {k: v for k, v in lm.model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
    blob = json.dumps([config, str(lm.dtype), sums, len(params)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
