"""The configuration of a whole run (`cud run`): the run's own fields and one section per stage,
each section the very settings object its stage function takes (so every default is stated
once, where that setting is defined), named presets, and a reader for TOML or YAML files that
names the file and key of every bad value.

A config file sets any subset of the fields, e.g.::

    model = "smollm2"
    data = "tofu:/data/tofu:forget10:retain90"
    preset = "tofu"

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

from cud.analysis.stage import AnalysisSettings
from cud.circuits.settings import CircuitSettings
from cud.data.prepare import DEFAULT_FORGET_FRACTION
from cud.data.text import TextSettings
from cud.difficulty.baselines import BaselineSettings
from cud.difficulty.pilot import PilotSettings
from cud.difficulty.study import StudySettings
from cud.errors import ConfigError, shown
from cud.limits import MAX_SEED, check_seed
from cud.report.html import ReportSettings
from cud.unlearning.finetune import FinetuneSettings
from cud.unlearning.folder import UnlearningSettings
from cud.unlearning.strategies import check_strategy


@dataclass(frozen=True)
class RunConfig:
    """A whole run. ``data``: any data spec (`builtin[:N[:SEED]]`, a file, a dataset folder, or
    ``tofu:FOLDER[:FORGET[:RETAIN]]``); ``limit`` caps it (each TOFU split);
    ``forget_fraction``: share of a non-TOFU set's authors that is forgotten;
    ``retain_authors``: keep the first N authors of a TOFU retain split; ``seed`` seeds the split,
    fine-tuning, the corrupted prompts, unlearning, the baselines and the anchor pools (each
    stage section's own ``seed`` is replaced by it); ``retest``: also measure every circuit a
    second time with independent corrupted prompts (seed + 1; ``circuits-retest/``), for the
    score's test-retest reliability. ``strategy``: after the plain methods, unlearn again with
    this strategy (:mod:`cud.unlearning.strategies`; ``plain``: not) into
    ``strategy-<name>/``, compared per method with plain (``comparison.csv``, a report
    section); ``strategy_difficulty``: the difficulty it reads and whose top quartile is the
    predicted-hard one: ``cud`` (the run's CUD score), ``loss`` or ``TABLE:COLUMN``. The
    strategy's own settings (``focus_every``, ...) are the ``[unlearning]`` section's; that
    section's ``strategy`` stays plain in a run (the plain methods are the ground truth).
    ``text``: how plain-text samples are split and cut (``[text] prefix_tokens``,
    ``max_tokens``: :class:`cud.data.text.TextSettings`)."""

    model: str = "smollm2"
    data: str = "builtin"
    limit: int | None = None
    forget_fraction: float = DEFAULT_FORGET_FRACTION
    retain_authors: int | None = None
    out: str = "cud-out"
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    retest: bool = True
    preset: str = "default"
    strategy: str = "plain"
    strategy_difficulty: str = "cud"
    text: TextSettings = field(default_factory=TextSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    circuits: CircuitSettings = field(default_factory=CircuitSettings)
    unlearning: UnlearningSettings = field(default_factory=UnlearningSettings)
    pilots: PilotSettings = field(default_factory=PilotSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    study: StudySettings = field(default_factory=StudySettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if not 0 < self.forget_fraction < 1:
            raise ConfigError(f"forget_fraction must be in (0, 1), got {self.forget_fraction}")
        check_seed(self.seed)
        if self.retest and self.seed == MAX_SEED:  # the retest's circuits use seed + 1
            raise ConfigError(f"seed must be below {MAX_SEED} with retest (the second "
                              f"measurement uses seed + 1)")
        if not str(self.out).strip():
            raise ConfigError("out: the output folder is empty")
        check_strategy(self.strategy)
        if self.unlearning.strategy != "plain":
            raise ConfigError(f"unlearning.strategy '{self.unlearning.strategy}': in a run the "
                              f"methods run plain (the ground truth); set strategy = "
                              f"\"{self.unlearning.strategy}\" (top level) to run it after them")

    def stage(self, name: str):
        """A stage's settings with the run's seed."""
        section = getattr(self, name)
        return replace(section, seed=self.seed) if hasattr(section, "seed") else section

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Named presets: changes applied to the defaults before a config file's own values.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # a small, complete run: 40 facts (8 authors), fewer integration steps and unlearning steps
    "quick": {
        "data": "builtin:40",
        "finetune": {"epochs": 5, "batch_size": 8},
        "retest": False,
        "circuits": {"steps": 2, "n_edges": 300, "draws": 2, "faithfulness_sizes": (),
                     "batch_size": 12},
        "unlearning": {"max_steps": 4, "utility": False},
        "baselines": {"mrd_k": 4},
        "study": {"k": 3, "sizes": (50, 300), "n_boot": 200, "n_perm": 200, "pools": 3,
                  "predictor": False, "variant_sizes": (75, 1000)},
    },
    # TOFU forget10 on SmolLM2 on a 2-core CPU (notes/tofu.md; the 2-hour target is not met):
    # a retain subset of 20 authors, bf16 matrix products for the fine-tune (not for unlearning,
    # see below, nor the baselines: MRD's 1e-5 weight noise is below bf16's resolution), 5 methods at the
    # calibrated "tofu" table, shorter greedy answers, 20 anchors a side, the easy/hard split
    # protocol (METHOD §8) with GradDiff; the second
    # measurement of the circuits (test-retest) is a separate run (`retest = true`)
    "tofu": {
        "retain_authors": 20,
        "retest": False,
        "finetune": {"epochs": 6, "batch_size": 16, "bf16": True, "group_by_length": True},
        # unlearning in fp32 products, batches in random order: the path the tofu table was
        # calibrated in; with bf16 and length-grouped batches GradDiff collapsed the same
        # fine-tuned model (notes/tofu.md)
        "unlearning": {"methods": ("graddiff", "npo", "simnpo", "rmu", "undial"),
                       "hyperparameters": "tofu", "bf16": False, "group_by_length": False,
                       "utility_samples": 50, "eval_batch_size": 32,
                       "generation_budget": 1.25},
        "baselines": {"mrd_k": 10},
        "study": {"k": 20, "split_method": "graddiff"},
    },
    # METHOD §5's reference hyperparameters and the baselines as their papers define them
    "paper": {
        "unlearning": {"hyperparameters": "paper"},
        "baselines": {"mrd_k": 100},
    },
}

_SECTION_CLASSES = {f.name: f.default_factory for f in fields(RunConfig)
                    if f.default_factory is not dataclasses.MISSING}


def _kinds(annotation: str) -> set[str]:
    """The scalar kinds a field's annotation allows (``"float | None"`` -> {float, none})."""
    return {part.strip() for part in str(annotation).replace("Optional[", "").rstrip("]")
            .split("|")}


def _coerce(value: Any, default: Any, annotation: str, where: str) -> Any:
    """Check a value against its field's type (tuples from lists, floats from ints, None only
    where the field allows it)."""
    kinds = _kinds(annotation)
    if value is None and "None" in kinds:
        return None
    if isinstance(default, tuple) or annotation.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        inner = "int" if "int" in annotation else "float" if "float" in annotation else "str"
        return tuple(_coerce(v, None, inner, where) for v in value)
    if isinstance(default, dict) or annotation.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {shown(value)}")
        return dict(value)
    if "bool" in kinds:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {shown(value)}")
        return value
    if "int" in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {shown(value)}")
        return value
    if "float" in kinds:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}")
        return float(value)
    if "str" in kinds:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {shown(value)}")
        return value
    raise ConfigError(f"{where}: unexpected value {shown(value)}")


def _replace_checked(obj: Any, changes: dict[str, Any], where: str) -> Any:
    """``replace(obj, **changes)``; a setting the object refuses names ``where``."""
    try:
        return replace(obj, **changes)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def apply(config: RunConfig, changes: dict[str, Any], source: str = "config") -> RunConfig:
    """``config`` with ``changes`` (nested dicts for sections) applied, each value checked."""
    top: dict[str, Any] = {}
    known = {f.name: f for f in fields(RunConfig)}
    for key, value in changes.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{key}' (known: "
                              f"{', '.join(sorted(known))})")
        if key in _SECTION_CLASSES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table of settings")
            section = top.get(key, getattr(config, key))
            names = {f.name: f for f in fields(section)}
            sub = {}
            for k, v in value.items():
                if k not in names:
                    raise ConfigError(f"{source}: unknown key '{key}.{k}' (known: "
                                      f"{', '.join(sorted(names))})")
                sub[k] = _coerce(v, getattr(section, k), str(names[k].type),
                                 f"{source}: {key}.{k}")
            top[key] = _replace_checked(section, sub, f"{source}: [{key}]")
        else:
            top[key] = _coerce(value, getattr(config, key), str(known[key].type),
                               f"{source}: {key}")
    return _replace_checked(config, top, source)


def with_preset(name: str, config: RunConfig | None = None) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    return apply(replace(config or RunConfig(), preset=name), PRESETS[name], f"preset {name}")


#: the most nodes a YAML config may hold with every alias expanded: a config is a few dozen
#: settings, and a few hundred bytes of nested aliases (an "alias bomb") expand to billions
MAX_YAML_NODES = 10_000


def _read_yaml(text: str, path: Path) -> Any:
    """A YAML document with the safe loader, refusing a key given twice in one mapping (the
    safe loader keeps the last silently) and aliases that expand past :data:`MAX_YAML_NODES`
    nodes; errors name the file and line."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<": merged, then overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the safe loader names it
                    break
                if first is not None:
                    raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: "
                                      f"{shown(key)} is given twice in one table (first on "
                                      f"line {first})")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{path}: its aliases expand to {size} values (at most "
                              f"{MAX_YAML_NODES}); write the settings out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML "
                          f"({getattr(e, 'problem', None) or e})") from None
    finally:
        loader.dispose()


def _expanded_size(root) -> int:
    """Nodes of a composed YAML tree with every alias expanded (an alias is the anchored node
    object itself), counted without expanding: each distinct node's size once."""
    import yaml
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            sizes[id(node)] = 1
            continue
        if done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
        else:
            stack.append((node, True))
            stack += [(c, False) for c in children if id(c) not in sizes]
    return sizes[id(root)]


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
        data = _read_yaml(text, path)
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
