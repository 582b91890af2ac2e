"""Fine-tuning: teach a model a QA set until it knows it, as TOFU's starting model was made.

The answer tokens are the only targets (the prompt is masked). Full fine-tuning or LoRA (through
``peft``; the adapters are merged before saving, so the result is a plain Hugging Face folder).
The folder is cached under a hash of (model, data, settings): asking again with the same three
loads it instead of training; any change trains anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from cud.data.encoding import EncodedSample, encode_samples
from cud.data.samples import QASample
from cud.errors import ConfigError, ModelError, StoreError
from cud.folders import make_temporary_folder
from cud.models.loading import BUNDLED, LoadedModel, load_model, prepare
from cud.models.precision import matmul_precision
from cud.models.answers import answer_nll, teacher_forced_outcomes
from cud.progress import Progress
from cud.unlearning.loop import TrainConfig, TrainLog, train

#: bump when the meaning of a cached folder changes (2: flat settings)
CACHE_VERSION = 2
META_FILE = "cud_finetune.json"


def default_cache_dir() -> Path:
    """``$CUD_CACHE/finetuned`` or ``~/.cache/cud/finetuned``."""
    root = os.environ.get("CUD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "cud") / "finetuned"


@dataclass(frozen=True)
class FinetuneSettings:
    """How a model is taught a QA set (`cud finetune`, ``[finetune]`` of `cud run`). The defaults
    teach SmolLM2-135M the default built-in set (100 facts) to >= 90% exact memorisation in a few
    minutes on 2 CPU cores (measured; see the project's notes).

    ``enabled`` and ``cache_dir`` say whether and where (`cud run` only; the cache defaults to
    ``$CUD_CACHE/finetuned`` or ``~/.cache/cud/finetuned``); every other field decides the
    weights and so the cache key. ``bf16``: matrix products in bfloat16 (autocast; the weights,
    the optimiser and the loss stay float32); None: on a GPU only.
    """

    enabled: bool = True
    lr: float = 3e-4
    epochs: float = 6
    batch_size: int = 10
    grad_accum: int = 1
    warmup: float = 0.1
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: bool | None = None
    group_by_length: bool = False
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target: str = "all-linear"
    #: also teach the end-of-sequence token after each answer, so greedy answers stop there
    #: (as a TOFU model's do) instead of running on into the next words
    teach_end: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        self.train_config().validate()

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, warmup=self.warmup,
                           schedule=self.schedule, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, seed=self.seed, bf16=self.bf16,
                           group_by_length=self.group_by_length)

    def key_dict(self) -> dict:
        """The settings that decide the fine-tuned weights (the cache key's part)."""
        d = asdict(self)
        for k in ("enabled", "cache_dir"):
            d.pop(k)
        if not self.lora:  # LoRA's own settings do not change a full fine-tune
            for k in ("lora_r", "lora_alpha", "lora_target"):
                d.pop(k)
        return d


@dataclass
class FinetuneResult:
    path: Path                 # the Hugging Face folder of the fine-tuned model
    reused: bool               # True when an earlier identical run's folder was loaded
    report: dict               # memorisation before/after, time, settings
    memorisation: pd.DataFrame  # per-sample teacher-forced outcomes after fine-tuning
    model: LoadedModel | None = None


def model_identity(spec: str) -> str:
    """A string that changes when the model a spec points to changes."""
    if spec in BUNDLED:
        from cud.models.loading import bundled_path
        try:
            p = bundled_path(spec)
            return f"bundled:{spec}:{p.stat().st_size}"
        except ModelError:
            return f"bundled:{spec}"
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted((f.name, f.stat().st_size) for f in path.iterdir() if f.is_file()
                       and f.suffix in (".json", ".safetensors", ".bin", ".gguf"))
        return f"folder:{path.resolve()}:{files}"
    if path.is_file():
        return f"file:{path.resolve()}:{path.stat().st_size}"
    return f"name:{spec}"


def cache_key(model: str, samples: Sequence[QASample], settings: FinetuneSettings) -> str:
    """sha256 over the model's identity, every sample's (id, question, answer) and the settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "model": model_identity(model),
                         "config": settings.key_dict()}, sort_keys=True).encode())
    for s in samples:
        h.update(s.identity().encode())
    return h.hexdigest()


def memorisation_summary(df: pd.DataFrame) -> dict:
    return {"exact_mem": float(df["exact_mem"].mean()),
            "fully_memorised": float((df["exact_mem"] >= 1.0).mean()),
            "prob": float(df["prob"].mean()), "nll": float(df["nll"].mean())}


def with_end_token(sample: EncodedSample, token_id: int) -> EncodedSample:
    """``sample`` with ``token_id`` appended as one more answer token (a training target)."""
    return EncodedSample(sample.id, sample.input_ids + (token_id,), sample.answer_mask + (True,),
                         sample.question_mask + (False,))


def save_hf_folder(model: torch.nn.Module, tokenizer, path: str | Path) -> None:
    """``save_pretrained`` of model and tokenizer. A model loaded from GGUF holds de-quantized
    full-precision weights but still carries the GGUF quantizer, which refuses to save: drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:  # a read-only property in some versions
                pass
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _nll_objective(model, batch, _retain):
    return answer_nll(model, batch).mean(), {}


def teach(model: torch.nn.Module, encoded: Sequence[EncodedSample], config: TrainConfig, *,
          pad_token_id: int, progress: Progress | None = None) -> TrainLog:
    """Minimise the answer NLL of ``encoded`` in place (no cache, no saving): the training part
    of :func:`finetune`, for models already in memory (e.g. tiny test models)."""
    return train(model, _nll_objective, encoded, None, config, pad_token_id=pad_token_id,
                 parameters=[p for p in model.parameters() if p.requires_grad],
                 progress=progress, task="fine-tuning")


def finetune(model: str, samples: Sequence[QASample],
             settings: FinetuneSettings = FinetuneSettings(), *, device: str | None = None,
             dtype: str | torch.dtype | None = None, force: bool = False,
             keep_model: bool = True, progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (a spec :func:`cud.models.load_model` accepts) on ``samples``.

    Returns the cached folder when this (model, data, settings) was trained before, unless
    ``force``. The folder holds the model, its tokenizer, ``cud_finetune.json`` (settings and
    memorisation report) and ``memorisation.parquet`` / ``.csv`` (per sample).
    ``progress`` (task ``fine-tuning``) is called after each optimizer step.
    """
    if not samples:
        raise ConfigError("fine-tuning needs at least one sample")
    key = cache_key(model, samples, settings)
    folder = Path(settings.cache_dir) if settings.cache_dir is not None else default_cache_dir()
    path = folder / key[:16]
    meta_path = path / META_FILE
    if meta_path.is_file() and not force:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("key") == key:
            table = pd.read_parquet(path / "memorisation.parquet")
            lm = load_model(str(path), device=device, dtype=dtype) if keep_model else None
            return FinetuneResult(path, True, meta["report"], table, lm)

    lm = load_model(model, device=device, dtype=dtype)
    # the memorisation passes in the training's precision (bf16: 0.045 s a TOFU sample, not 0.099)
    with matmul_precision(lm.device, settings.bf16):
        before = memorisation_summary(teacher_forced_outcomes(lm, samples))
    encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    if settings.teach_end and eos is not None:
        encoded = [with_end_token(e, int(eos)) for e in encoded]
    net = lm.model
    if settings.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:  # pragma: no cover - peft is a dependency
            raise ConfigError("LoRA fine-tuning needs the 'peft' package") from None
        target = settings.lora_target if settings.lora_target == "all-linear" \
            else [t.strip() for t in settings.lora_target.split(",")]
        net = get_peft_model(net, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                             lora_dropout=0.0, target_modules=target,
                                             task_type="CAUSAL_LM"))

    log = teach(net, encoded, settings.train_config(), pad_token_id=lm.pad_token_id,
                progress=progress)
    if settings.lora:
        net = net.merge_and_unload()
    lm = prepare(net, lm.tokenizer, name=str(path))
    with matmul_precision(lm.device, settings.bf16):
        table = teacher_forced_outcomes(lm, samples)
    report = {"model": model, "samples": len(samples), "config": settings.key_dict(),
              "train_seconds": round(log.seconds, 2), "steps": log.total_steps,
              "final_loss": log.steps[-1]["loss"] if log.steps else None,
              "before": before, "after": memorisation_summary(table)}

    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = make_temporary_folder(path)
        save_hf_folder(net, lm.tokenizer, tmp)
        table.to_parquet(tmp / "memorisation.parquet")
        table.to_csv(tmp / "memorisation.csv")
        (tmp / META_FILE).write_text(json.dumps({"key": key, "report": report}, indent=1) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"cannot write the fine-tuned model to {path}: {e}") from None
    return FinetuneResult(path, False, report, table, lm if keep_model else None)
