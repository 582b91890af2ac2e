"""Helpers shared by several commands: progress bars, loading a model, reading samples."""

from __future__ import annotations

from typing import Optional

from cud.cli.app import console, fail


def progress_bar():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                    transient=True)


def samples_for(data: str, split: Optional[str], limit: Optional[int]):
    from cud.data import load_qa
    from cud.unlearning.outcomes import add_perturbed_answers, has_perturbations
    samples = load_qa(data, split=split, limit=limit)
    # the truth ratio needs wrong answers of the same kind; data without TOFU's perturbed
    # answers (e.g. the built-in facts) gets them from other samples' answers
    if not any(has_perturbations(s) for s in samples):
        samples = add_perturbed_answers(samples)
    return samples


def finetune_config(lr, epochs, batch_size, lora, lora_r, seed):
    from dataclasses import replace as _replace
    from cud.unlearning.finetune import FinetuneConfig, default_train_config
    train = default_train_config()
    changes = {k: v for k, v in dict(lr=lr, epochs=epochs, batch_size=batch_size,
                                     seed=seed).items() if v is not None}
    return FinetuneConfig(train=_replace(train, **changes), lora=lora,
                          **({"lora_r": lora_r} if lora_r else {}))


def run_finetune(model, samples, config, cache_dir, device, force, keep_model=True):
    from cud.unlearning.finetune import finetune
    with progress_bar() as bar:
        task = bar.add_task("fine-tuning", total=None, info="")
        result = finetune(model, samples, config=config, cache_dir=cache_dir, device=device,
                          force=force, keep_model=keep_model,
                          progress=lambda s, t, row: bar.update(
                              task, completed=s, total=t, info=f"loss {row['loss']:.3f}"))
    return result


def load(model: str, device: Optional[str], dtype: Optional[str] = None):
    from cud.models import load_model
    with console.status(f"loading {model}"):
        return load_model(model, device=device, dtype=dtype)


def parse_params(params: list[str]) -> dict:
    out = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--param expects NAME=VALUE, got '{item}'")
        try:
            out[key] = None if value.lower() == "none" else \
                int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            fail(f"--param {key}: expected a number, got '{value}'")
    return out
