"""What several commands share: loading the model (optionally teaching it the data first)."""

from __future__ import annotations

from typing import Optional

from cud.cli.app import console
from cud.cli.render import progress_bars


def load(model: str, device: Optional[str], dtype: Optional[str] = None):
    from cud.models import load_model
    with console.status(f"loading {model}"):
        return load_model(model, device=device, dtype=dtype)


def load_or_teach(model: str, samples, teach: bool, device: Optional[str],
                  dtype: Optional[str] = None):
    """``model`` loaded, or with ``teach`` fine-tuned on ``samples`` first (default settings,
    cached) and that model loaded."""
    if not teach:
        return load(model, device, dtype)
    from cud.unlearning.finetune import finetune
    with progress_bars() as bar:
        result = finetune(model, samples, device=device, dtype=dtype, keep_model=True,
                          progress=bar)
    return result.model
