"""The configuration of a whole run (`cud run`): one dataclass per stage, named presets, and a
reader for TOML or YAML files that names the file and key of every bad value.

A config file sets any subset of the fields, e.g.::

    model = "smollm2"
    data = "tofu:../shared/data/tofu:forget10:retain90"
    preset = "quick"

    [circuits]
    n_edges = 100

    [unlearning]
    methods = ["graddiff", "npo", "simnpo"]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cud.errors import ConfigError


@dataclass(frozen=True)
class FinetuneStage:
    enabled: bool = True        # teach the model the whole data set first (TOFU's set-up)
    epochs: float | None = None  # None: the fine-tuning defaults (6 epochs, lr 3e-4, batch 10)
    lr: float | None = None
    batch_size: int | None = None
    lora: bool = False
    cache_dir: str | None = None


@dataclass(frozen=True)
class CircuitsStage:
    method: str = "eap-ig-activations"
    steps: int = 5
    baseline: str = "corrupt"
    metric: str = "kl"
    selection: str = "greedy"
    n_edges: int = 75
    threshold: float | None = None
    batch_size: int = 8
    faithfulness: bool = True


@dataclass(frozen=True)
class UnlearningStage:
    methods: tuple[str, ...] = ("graddiff", "npo")
    preset: str = "quick"
    forget_fraction: float = 0.5  # built-in data: share of authors in the forget set
    eval_every: int | None = None
    max_steps: int | None = None
    utility: bool = True


@dataclass(frozen=True)
class BaselinesStage:
    enabled: bool = True
    metrics: tuple[str, ...] = ("loss", "prob", "exact_mem", "min_k_prob", "grad_norm", "mrd",
                                "random")
    mrd_k: int = 20
    mrd_sigma: float = 1e-5


@dataclass(frozen=True)
class StudyStage:
    k: int = 5
    vote: str = "majority"
    pool_fraction: float = 0.5
    distance: str = "cosine"
    weighted: bool = False
    sizes: tuple[int, ...] = (50, 75, 100, 200)
    n_boot: int = 1000
    predictor: bool = True


@dataclass(frozen=True)
class ReportStage:
    enabled: bool = True
    title: str = "CUD report"


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2"
    data: str = "builtin"
    limit: int | None = None
    out: str = "cud-out"
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    preset: str = "default"
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    circuits: CircuitsStage = field(default_factory=CircuitsStage)
    unlearning: UnlearningStage = field(default_factory=UnlearningStage)
    baselines: BaselinesStage = field(default_factory=BaselinesStage)
    study: StudyStage = field(default_factory=StudyStage)
    report: ReportStage = field(default_factory=ReportStage)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Named presets: changes applied to the defaults before a config file's own values.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # a small, complete run: 40 facts (8 authors), fewer integration steps and unlearning steps
    "quick": {
        "data": "builtin:40",
        "finetune": {"epochs": 5, "batch_size": 8},
        "circuits": {"steps": 2, "n_edges": 50, "batch_size": 12},
        "unlearning": {"max_steps": 4, "utility": False},
        "baselines": {"mrd_k": 4},
        "study": {"k": 3, "sizes": (25, 50, 100), "n_boot": 200, "predictor": False},
    },
}

_SECTION_CLASSES = {"finetune": FinetuneStage, "circuits": CircuitsStage,
                    "unlearning": UnlearningStage, "baselines": BaselinesStage,
                    "study": StudyStage, "report": ReportStage}


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a value against the type of its default (tuples from lists; ints for floats)."""
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = default[0] if default else None
        return tuple(_coerce(v, inner, where) if inner is not None else v for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value  # None defaults: any scalar


def apply(config: RunConfig, changes: dict[str, Any], source: str = "config") -> RunConfig:
    """``config`` with ``changes`` (nested dicts for sections) applied, each value checked."""
    top: dict[str, Any] = {}
    for key, value in changes.items():
        if key in _SECTION_CLASSES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table of settings")
            section = getattr(config, key)
            names = {f.name for f in fields(section)}
            sub = {}
            for k, v in value.items():
                if k not in names:
                    raise ConfigError(f"{source}: unknown key '{key}.{k}' (known: "
                                      f"{', '.join(sorted(names))})")
                sub[k] = _coerce(v, getattr(section, k), f"{source}: {key}.{k}")
            top[key] = replace(section, **sub)
        else:
            names = {f.name for f in fields(RunConfig)}
            if key not in names:
                raise ConfigError(f"{source}: unknown key '{key}' (known: "
                                  f"{', '.join(sorted(names))})")
            top[key] = _coerce(value, getattr(config, key), f"{source}: {key}")
    return replace(config, **top)


def with_preset(name: str, config: RunConfig | None = None) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    return apply(replace(config or RunConfig(), preset=name), PRESETS[name], f"preset {name}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.toml`` or ``.yaml``/``.yml`` file into a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: invalid YAML "
                              f"({getattr(e, 'problem', None) or e})") from None
    else:
        raise ConfigError(f"{path}: unknown config format (use .toml, .yaml or .yml)")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of settings")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                preset: str | None = None) -> RunConfig:
    """Defaults, then the preset (from ``preset``, else the file's ``preset`` key), then the
    file, then ``overrides`` (e.g. from the command line)."""
    data = read_config_file(path) if path else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = preset or overrides.get("preset") or data.get("preset") or "default"
    if not isinstance(name, str):
        raise ConfigError(f"{path}: preset must be a string")
    try:
        config = with_preset(name)
    except ConfigError as e:
        from_file = path and not (preset or overrides.get("preset"))
        raise ConfigError(f"{path}: {e}" if from_file else str(e)) from None
    config = apply(config, {k: v for k, v in data.items() if k != "preset"}, str(path))
    return apply(config, {k: v for k, v in overrides.items() if k != "preset"},
                 "command line")
