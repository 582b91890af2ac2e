"""What several commands share: loading the model (optionally teaching it the data first), and
saying which texts of the data the model's window cuts."""

from __future__ import annotations

from typing import Optional

from cud.cli.app import console
from cud.cli.render import progress_bars


def say_text_cuts(samples, model: str) -> None:
    """One line per data file whose texts are cut to the window of ``model`` (a model spec):
    :func:`cud.data.text.cut_notices` with the model's tokenizer and maximum positions. Reads
    nothing for QA data; nothing is said when the tokenizer cannot be read (loading the model
    next says why)."""
    from cud.data.text import cut_notices, is_text
    texts = [s for s in samples if is_text(s)]
    if not texts:
        return
    from transformers import AutoConfig, AutoTokenizer

    from cud.models.loading import _quiet_transformers, resolve
    try:
        where, gguf = resolve(model)
        kwargs = {"local_files_only": True, **({"gguf_file": gguf} if gguf else {})}
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(where), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(where), **kwargs)
    except Exception:  # a bad spec, config or tokenizer raises many types; load_model names it
        return
    max_positions = getattr(config, "max_position_embeddings", None) or \
        getattr(config, "n_positions", None)
    for line in cut_notices(texts, tokenizer, max_length=max_positions):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


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
