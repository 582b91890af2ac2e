"""Shared fixtures: tiny models of the three families (built in memory, cached per session) and a
few QA samples of different lengths."""

from __future__ import annotations

import pytest
import torch

from cud.data import fictitious_authors
from cud.models import tiny_model

FAMILIES = ("llama", "gpt2", "gpt_neox")


def randomise_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add N(0, scale^2) noise to every parameter, in place.

    Fresh HF models have zero biases, unit norm weights and near-uniform attention, which would
    hide a misplaced bias, norm or mask; the noise makes every parameter matter.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model


@pytest.fixture(scope="session")
def randomise():
    """The function :func:`randomise_`, for tests that build their own models."""
    return randomise_


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and 2 shared cores thrash with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_lm():
    """``make_lm(family, dtype=torch.float32, randomised=True, **overrides)`` -> a cached
    LoadedModel. Shared between tests: never modify the model you get."""
    cache = {}

    def make(family: str, dtype: torch.dtype = torch.float32, randomised: bool = True,
             **overrides):
        key = (family, dtype, randomised, tuple(sorted(overrides.items())))
        if key not in cache:
            lm = tiny_model(family, seed=0, **overrides)
            if randomised:
                randomise_(lm.model)
            lm.model.to(dtype)
            cache[key] = lm
        return cache[key]

    return make


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def qa_samples():
    """Ten built-in samples; the first four have four different token lengths."""
    return fictitious_authors(10, seed=0)
