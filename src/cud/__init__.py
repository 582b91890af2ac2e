"""cud: Circuit-guided Unlearning Difficulty.

Tells, before unlearning, which samples of a forget set will be hard to erase from a language
model and why, from the model's own per-sample circuits (EAP-IG). See METHOD.md of the project.
"""

from cud.errors import ConfigError, CudError, DataError, ModelError, StoreError

__version__ = "0.1.0"

__all__ = ["CudError", "DataError", "ModelError", "ConfigError", "StoreError", "__version__"]
