"""One adapter per architecture family; :func:`adapter_for` picks it from ``config.model_type``."""

from __future__ import annotations

from cud.errors import ModelError
from cud.models.adapters.base import AttentionContext, ReaderNorm, ResidualAdapter
from cud.models.adapters.gemma import GemmaAdapter
from cud.models.adapters.gemma2 import Gemma2Adapter
from cud.models.adapters.gemma3 import Gemma3TextAdapter
from cud.models.adapters.gpt2 import GPT2Adapter
from cud.models.adapters.gpt_neox import GPTNeoXAdapter
from cud.models.adapters.llama import LlamaAdapter
from cud.models.adapters.olmo2 import Olmo2Adapter
from cud.models.adapters.phi import PhiAdapter
from cud.models.adapters.phi3 import Phi3Adapter
from cud.models.adapters.qwen3 import Qwen3Adapter

ADAPTERS: tuple[type[ResidualAdapter], ...] = (LlamaAdapter, GPT2Adapter, GPTNeoXAdapter,
                                               PhiAdapter, Phi3Adapter, Qwen3Adapter,
                                               GemmaAdapter, Olmo2Adapter, Gemma2Adapter,
                                               Gemma3TextAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model) -> ResidualAdapter:
    """The adapter of ``model``'s family; a :class:`ModelError` naming the supported ones if none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise ModelError(f"unsupported architecture '{model_type}' (supported: "
                     f"{', '.join(supported_model_types())})")


__all__ = ["ResidualAdapter", "AttentionContext", "ReaderNorm", "adapter_for",
           "supported_model_types", "LlamaAdapter", "GPT2Adapter", "GPTNeoXAdapter", "PhiAdapter",
           "Phi3Adapter", "Qwen3Adapter", "GemmaAdapter", "Olmo2Adapter",
           "Gemma2Adapter", "Gemma3TextAdapter"]
