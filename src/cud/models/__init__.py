"""Models: offline loading (local folder, GGUF, bundled SmolLM2), device/dtype choice, tiny test
models, and the architecture adapters that give a common residual-stream view."""

from cud.models.adapters import ResidualAdapter, adapter_for, supported_model_types
from cud.models.loading import (BUNDLED, DEFAULT_MODEL, LoadedModel, load_model, pick_device,
                                pick_dtype, prepare)
from cud.models.tiny import FAMILIES, tiny_model, tiny_tokenizer

__all__ = ["load_model", "prepare", "LoadedModel", "DEFAULT_MODEL", "BUNDLED", "pick_device",
           "pick_dtype", "ResidualAdapter", "adapter_for", "supported_model_types", "tiny_model",
           "tiny_tokenizer", "FAMILIES"]
