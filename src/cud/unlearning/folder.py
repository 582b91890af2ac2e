"""The unlearning stage (`cud unlearn`, the unlearning stage of `cud run`): every method on one
forget set, written to a folder, one sub-folder per method (the layout
:func:`cud.difficulty.groundtruth.read_outcomes` reads)::

    unlearning.json                which model and which forget / retain sets the folder is for
                                   (and the text hash of each forget sample: `cud validate`
                                   refuses circuits of other texts)
    before.parquet/.csv            forget-set outcomes of the model before unlearning
    retain_before.parquet/.csv     its retain-set NLL, probability, exact memorisation
    <method>/outcomes.parquet/.csv per-sample deltas and steps to forget
    <method>/after.parquet/.csv    forget-set outcomes after unlearning
    <method>/trajectory.csv        per-sample NLL every k steps (with eval_every)
    <method>/settings.json         the method's settings, training time, retain NLL change, utility,
                                   the rate used and ``collapsed`` (retain NLL rise over the budget)
    <method>/calibration.json      with ``calibrate``: each rate tried and its held retain NLL rise
    strategy.csv                   with a strategy: each forget sample's difficulty and its
                                   weight (reweight) or stage (curriculum)
    agreement_nll_delta.csv        Spearman agreement of the methods' NLL increases
    prices.json                    seconds per forget sample of the evaluation before unlearning
                                   and of each method (training, evaluation after, utility)

Resumable like a circuits folder: ``unlearning.json`` holds the model's fingerprint and hashes
of the forget and retain sets, and each method's ``settings.json`` the request it ran; a method
already run with the same request is read back, not run again, and a folder of another model,
other data or other settings of a method is refused with the settings that differ (never
mixed). The evaluations before unlearning (forget and retain set) are shared by every method.
A folder holds one strategy (:mod:`cud.unlearning.strategies`; ``plain`` leaves no trace, so
folders written before strategies existed read as plain): the manifest records its name, its
difficulty source and a hash of the difficulties, and another strategy or difficulty is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd

from cud.data.general import general_knowledge
from cud.data.samples import QASample
from cud.circuits.store import text_hash
from cud.errors import ConfigError, StoreError
from cud.folders import folder_lock, replacing, stored_request, write_text
from cud.limits import check_amount, check_count, check_probability
from cud.models.fingerprint import model_fingerprint
from cud.models.loading import LoadedModel
from cud.models.precision import matmul_precision
from cud.progress import Progress
from cud.prices import record_price
from cud.tables import write_csv
from cud.unlearning.calibration import (DEFAULT_BUDGET, DEFAULT_GRID, DEFAULT_HELD, calibrate,
                                        check_calibration, held_retain, held_rise, is_collapsed)
from cud.unlearning.hyperparameters import DEFAULT_TABLE, TABLES, hyperparameters
from cud.unlearning.loop import MAX_BATCH
from cud.unlearning.methods import METHODS
from cud.unlearning.outcomes import (ALL_METRICS, TEACHER_FORCED, evaluate_outcomes,
                                     model_utility, save_outcomes)
from cud.unlearning.run import (
    DEFAULT_FORGET_THRESHOLD,
    retain_outcomes,
    spread,
    unlearn,
)
from cud.unlearning.strategies import (COMPUTED, NEEDS_DIFFICULTY, ORDERS, check_strategy,
                                       difficulty_hash, plan, read_difficulty)

MANIFEST = "unlearning.json"
#: the most samples ``utility_samples`` may ask for
MAX_SAMPLES = 10_000_000
#: the longest greedy answer ``generation_budget`` may ask for, in times the true answer's tokens
MAX_GENERATION_BUDGET = 100
FORMAT_VERSION = 1


def _hyperparameter_names(method: str) -> set[str]:
    """The hyperparameters of a method: its dataclass fields (not its class constants)."""
    import dataclasses
    return {f.name for f in dataclasses.fields(METHODS[method]) if not f.name.startswith("_")}


@dataclass(frozen=True)
class UnlearningSettings:
    """What the unlearning stage runs. ``hyperparameters`` names a table of
    :mod:`cud.unlearning.hyperparameters`; ``params`` (method hyperparameters, e.g.
    ``{"alpha": 2}``) and the training fields set to a value override it for every method
    (a parameter a method does not have is ignored for that method; one that no method run
    has is refused). ``threshold``: a probability in (0, 1). ``bf16``: matrix products
    in bfloat16 for training and every evaluation (:mod:`cud.models.precision`).
    ``utility``: also measure model utility (retain set and general knowledge) after each
    method, on the first ``utility_samples`` retain samples (all when None).
    ``eval_batch_size``: samples per evaluation pass; ``generation_budget``: greedy answers
    stop after that many times the true answer's tokens, plus 8; ``eval_bf16``: the outcome
    evaluations (before, after, retain, utility) in bfloat16 products, each weight cast once per
    evaluation (``bf16`` already puts them in bf16, without that cache). ``answers``: the
    outcomes before and after also hold the greedy answers (ROUGE-L recall) and the truth ratio;
    off, only the teacher-forced ones (NLL, probability, exact memorisation, extraction
    strength: everything forgetting and the validation read), for sweeps of many runs where the
    greedy decoding would cost most of the evaluation. ``save_model``: keep each
    unlearned model in the folder (does not change the results).

    ``calibrate``: methods whose learning rate is chosen first (:mod:`cud.unlearning.calibration`):
    the largest of ``calibration_grid`` x the method's rate whose mean retain NLL rise on a held
    ``calibration_held`` share of the retain set (never trained on, by any run of that method)
    stays within ``retain_budget`` nats. ``retain_budget`` also flags any method whose retain NLL
    rise exceeds it as ``collapsed`` (on the held part when calibrated, else on the retain set).

    ``strategy`` (:mod:`cud.unlearning.strategies`): how every method's loop spends its steps:
    ``plain`` (the methods as they are), ``reweight``, ``curriculum``, ``focus`` or
    ``localize``. ``difficulty``: where reweight and curriculum read each forget sample's
    difficulty (higher = harder): ``TABLE:COLUMN`` of a .csv/.parquet table with an ``id``
    column, or ``loss`` (minus the answer NLL before unlearning). ``reweight_min`` /
    ``reweight_max``: the weights' clip; ``curriculum_order``: ``easy-to-hard`` or
    ``hard-to-easy``; ``focus_every``: steps between focus's re-reads of the probabilities
    (forgotten below ``threshold``); ``localize_k``: how many components of the circuits in
    the folder ``circuits`` localize lets move. A folder holds one strategy (and difficulty)."""

    methods: tuple[str, ...] = ("graddiff", "npo")
    hyperparameters: str = DEFAULT_TABLE
    params: dict = field(default_factory=dict)
    lr: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    bf16: bool | None = None
    group_by_length: bool = False
    eval_every: int | None = None
    threshold: float = DEFAULT_FORGET_THRESHOLD
    utility: bool = True
    utility_samples: int | None = None
    eval_batch_size: int = 16
    generation_budget: float = 2.0
    eval_bf16: bool = False
    answers: bool = True
    seed: int = 0
    save_model: bool = False
    calibrate: tuple[str, ...] = ()
    retain_budget: float = DEFAULT_BUDGET
    calibration_grid: tuple[float, ...] = DEFAULT_GRID
    calibration_held: float = DEFAULT_HELD
    strategy: str = "plain"
    difficulty: str | None = None
    circuits: str | None = None
    reweight_min: float = 0.25
    reweight_max: float = 4.0
    curriculum_order: str = "easy-to-hard"
    focus_every: int = 5
    localize_k: int = 8

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("unlearning.methods: give at least one method")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"unknown unlearning method '{m}' (choose from "
                                  f"{', '.join(METHODS)})")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"unlearning.methods lists a method twice: {list(self.methods)}")
        if self.hyperparameters not in TABLES:
            raise ConfigError(f"unknown hyperparameter table '{self.hyperparameters}' "
                              f"(choose from {', '.join(TABLES)})")
        for key, value in self.params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
                raise ConfigError(f"unlearning.params.{key}: expected a number, got {value!r}")
        known = sorted({f for m in self.methods for f in _hyperparameter_names(m)})
        unknown = [k for k in self.params if k not in known]
        if unknown:  # a parameter no method run has would be silently ignored
            raise ConfigError(f"unknown method hyperparameter {', '.join(map(repr, unknown))} "
                              f"(those of {', '.join(self.methods)}: "
                              f"{', '.join(known) or 'none'})")
        check_probability(self.threshold, "threshold")
        check_count(self.eval_batch_size, "eval_batch_size", MAX_BATCH)
        check_amount(self.generation_budget, "generation_budget", MAX_GENERATION_BUDGET)
        if self.utility_samples is not None:
            check_count(self.utility_samples, "utility_samples", MAX_SAMPLES)
        for m in self.methods:
            self.train_config(m).validate()
        stray = [m for m in self.calibrate if m not in self.methods]
        if stray:
            raise ConfigError(f"calibrate lists {', '.join(stray)}, not among the methods run "
                              f"({', '.join(self.methods)})")
        check_calibration(self.calibration_grid, self.retain_budget, self.calibration_held)
        self._check_strategy()

    def _check_strategy(self) -> None:
        check_strategy(self.strategy)
        reads = self.strategy in NEEDS_DIFFICULTY
        if reads and not self.difficulty:
            raise ConfigError(f"unlearning.strategy '{self.strategy}' needs unlearning.difficulty "
                              f"(TABLE:COLUMN or {', '.join(COMPUTED)})")
        if self.difficulty and not reads:
            raise ConfigError(f"unlearning.difficulty is read only by the strategies "
                              f"{', '.join(NEEDS_DIFFICULTY)}, not '{self.strategy}'")
        if self.strategy == "localize" and not self.circuits:
            raise ConfigError("unlearning.strategy 'localize' needs unlearning.circuits (the "
                              "forget set's circuits folder)")
        if not 0 < self.reweight_min <= 1 <= self.reweight_max:
            raise ConfigError(f"unlearning.reweight_min/max must satisfy 0 < min <= 1 <= max, "
                              f"got {self.reweight_min}, {self.reweight_max}")
        if self.curriculum_order not in ORDERS:
            raise ConfigError(f"unlearning.curriculum_order: '{self.curriculum_order}' (choose "
                              f"from {', '.join(ORDERS)})")
        if self.focus_every < 1 or self.localize_k < 1:
            raise ConfigError("unlearning.focus_every and unlearning.localize_k must be at "
                              "least 1")

    def strategy_request(self) -> dict | None:
        """The strategy's settings that decide outcomes (None for plain)."""
        if self.strategy == "plain":
            return None
        own = {"reweight": {"reweight_min": self.reweight_min, "reweight_max": self.reweight_max},
               "curriculum": {"order": self.curriculum_order},
               "focus": {"focus_every": self.focus_every},
               "localize": {"localize_k": self.localize_k, "circuits": self.circuits}}
        return {"name": self.strategy, "difficulty": self.difficulty, **own[self.strategy]}

    def method_hyperparameters(self, method: str) -> dict:
        hyper, _ = hyperparameters(method, self.hyperparameters)
        known = _hyperparameter_names(method)
        return {**hyper, **{k: v for k, v in self.params.items() if k in known}}

    def train_config(self, method: str):
        _, train = hyperparameters(method, self.hyperparameters)
        changes = {k: v for k, v in dict(lr=self.lr, epochs=self.epochs,
                                         max_steps=self.max_steps, batch_size=self.batch_size,
                                         grad_accum=self.grad_accum, bf16=self.bf16,
                                         eval_every=self.eval_every).items() if v is not None}
        return replace(train, seed=self.seed, group_by_length=self.group_by_length, **changes)

    def request(self, method: str) -> dict:
        """Everything that decides one method's outcomes (compared on resume)."""
        return {"method": method, "table": self.hyperparameters,
                "hyperparameters": self.method_hyperparameters(method),
                "train": self.train_config(method).to_dict(), "threshold": self.threshold,
                "utility": self.utility, "utility_samples": self.utility_samples,
                "eval_batch_size": self.eval_batch_size,
                "generation_budget": self.generation_budget,
                **({"eval_bf16": True} if self.eval_bf16 else {}),
                **({"answers": False} if not self.answers else {}),
                **({"strategy": self.strategy_request()} if self.strategy != "plain" else {}),
                **({"calibration": {"grid": list(self.calibration_grid),
                                    "budget": self.retain_budget,
                                    "held": self.calibration_held}}
                   if method in self.calibrate else {})}

    def retain_split(self, method: str, retain: Sequence[QASample]
                     ) -> tuple[list[QASample], list[QASample]]:
        """(the retain samples ``method`` trains on, the held part): the whole retain set and
        nothing unless the method is calibrated (:func:`held_retain`, seeded by ``seed``)."""
        if method in self.calibrate and retain:
            return held_retain(retain, self.calibration_held, self.seed)
        return list(retain), []

    def outcome_metrics(self) -> tuple[str, ...]:
        """The outcome metrics evaluated before and after each method (``answers``)."""
        return ALL_METRICS if self.answers else TEACHER_FORCED

    def to_dict(self) -> dict:
        return asdict(self)


def samples_hash(samples: Sequence[QASample]) -> str:
    """Identifies a set of samples: ids, questions and answers, in order."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.identity().encode())
    return h.hexdigest()[:16]


@dataclass
class UnlearningRun:
    """What :func:`unlearn_to_folder` did: one summary row per method (NLL-increase quartiles,
    share forgotten, retain NLL change, training time, reused or run), the per-sample NLL
    increase of every method, and their Spearman agreement (None with one method)."""

    root: Path
    summary: pd.DataFrame
    deltas: pd.DataFrame
    agreement: pd.DataFrame | None


def _manifest(lm: LoadedModel, forget, retain, eval_bf16: bool,
              strategy: dict | None = None, answers: bool = True) -> dict:
    return {"kind": "cud-unlearning", "format_version": FORMAT_VERSION, "model": lm.name,
            "model_fingerprint": model_fingerprint(lm), "forget": samples_hash(forget),
            "n_forget": len(forget), "retain": samples_hash(retain),
            "n_retain": len(retain), **({"eval_bf16": True} if eval_bf16 else {}),
            **({"answers": False} if not answers else {}),
            **({"strategy": strategy} if strategy is not None else {}),
            "text_hashes": {s.id: text_hash(s) for s in forget}}


def _check_manifest(root: Path, manifest: dict) -> bool:
    """Whether ``root`` has a manifest; refuses one of another model, other sets, another
    precision of the shared evaluation before unlearning or another strategy."""
    path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: output path exists and is not a folder")
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable ({e}); use another --out folder") from None
    if old.get("kind") != "cud-unlearning" or old.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: not a cud unlearning folder of format {FORMAT_VERSION}")
    if old.get("strategy") != manifest.get("strategy"):
        def say(record):
            if record is None:
                return "plain"
            return record["name"] + (f" (difficulty {record['difficulty']})"
                                     if record.get("difficulty") else "")
        raise StoreError(f"{root}: holds unlearning results of strategy "
                         f"{say(old.get('strategy'))}, this run asks for "
                         f"{say(manifest.get('strategy'))} (or its data differ); use another "
                         f"--out folder so strategies do not mix")
    differ = [k for k in ("model_fingerprint", "forget", "retain", "eval_bf16", "answers")
              if old.get(k, k == "answers") != manifest.get(k, k == "answers")]
    if differ:
        what = {"model_fingerprint": "another model", "forget": "another forget set",
                "retain": "another retain set",
                "eval_bf16": "evaluations in another precision (eval_bf16)",
                "answers": "evaluations with other outcomes (answers: greedy answers and "
                           "truth ratio, or teacher-forced only)"}
        raise StoreError(f"{root}: holds unlearning results of "
                         f"{', '.join(what[k] for k in differ)}; use another --out folder "
                         f"so old and new results do not mix")
    return True


def _open(root: Path, lm: LoadedModel, forget, retain, eval_bf16: bool = False,
          strategy: dict | None = None, answers: bool = True) -> None:
    """Create the folder's manifest or check that it describes this model, these sets, the
    precision of the shared evaluation before unlearning and the strategy (None: plain)."""
    manifest = _manifest(lm, forget, retain, eval_bf16, strategy, answers)
    if not _check_manifest(root, manifest):
        root.mkdir(parents=True, exist_ok=True)
        write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def check_unlearning_folder(lm: LoadedModel, forget: Sequence[QASample],
                            retain: Sequence[QASample], out: str | Path,
                            settings: UnlearningSettings = UnlearningSettings()) -> None:
    """What :func:`unlearn_to_folder` would refuse, found without writing anything (`cud run`
    checks every stage before any writes): a folder of another model or other sets, a method
    (or its calibration) of other settings."""
    root = Path(out)
    forget = list(forget)
    record = _strategy_data(lm, forget, settings)[0]
    _check_manifest(root, _manifest(lm, forget, list(retain), settings.eval_bf16, record,
                                    settings.answers))
    for name in settings.methods:
        request = settings.request(name)
        if _stored_method(root / name, name, request) is None and name in settings.calibrate:
            _stored_calibration(root / name, name, request)


def forget_text_hashes(out: str | Path) -> dict[str, str]:
    """``{id: text hash}`` of the forget samples an unlearning folder was made for (empty for
    a folder written before they were kept, or no unlearning folder)."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    hashes = manifest.get("text_hashes") if isinstance(manifest, dict) else None
    return {str(k): str(v) for k, v in hashes.items()} if isinstance(hashes, dict) else {}


def _stored_method(folder: Path, name: str, request: dict) -> dict | None:
    """The stored settings of ``name`` run with ``request`` (None when it has not run);
    refuses results of another request."""
    if not (folder / "outcomes.parquet").exists():
        return None
    return stored_request(folder / "settings.json", request, folder, f"{name} results")


def _stored_calibration(folder: Path, name: str, request: dict) -> dict:
    """The rises of ``name``'s calibration made with ``request`` so far (rate -> rise);
    refuses a calibration of another request."""
    old = stored_request(folder / "calibration.json", request, folder,
                         f"a {name} calibration") or {}
    return {float(r): float(v) for r, v in old.get("rises", {}).items()}


def _read(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path)
    return table.set_index("id") if "id" in table.columns else table


def unlearn_to_folder(lm: LoadedModel, forget: Sequence[QASample], retain: Sequence[QASample],
                      out: str | Path, settings: UnlearningSettings = UnlearningSettings(), *,
                      progress: Progress | None = None) -> UnlearningRun:
    """Run each method of ``settings`` on a copy of ``lm`` and write its outcomes under ``out``
    (created, or resumed: see the module docstring); one process at a time
    (:func:`~cud.folders.folder_lock`)."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: output path exists and is not a folder")
    with folder_lock(root):
        return _unlearn_to_folder(lm, list(forget), list(retain), root, settings, progress)


def _unlearn_to_folder(lm, forget, retain, root: Path, settings: UnlearningSettings,
                       progress) -> UnlearningRun:
    record, difficulty, masks = _strategy_data(lm, forget, settings)
    _open(root, lm, forget, retain, settings.eval_bf16, record, settings.answers)
    before_path = root / "before.parquet"
    if before_path.exists():
        before = _read(before_path)
    else:
        began = time.perf_counter()
        with matmul_precision(lm.device, settings.bf16):
            before = evaluate_outcomes(lm, forget, metrics=settings.outcome_metrics(),
                                       batch_size=settings.eval_batch_size,
                                       generation_budget=settings.generation_budget,
                                       bf16=settings.eval_bf16, progress=progress)
        save_outcomes(before, root / "before")
        record_price(root, "evaluation_before", time.perf_counter() - began, len(forget),
                     what="outcomes of the forget set before unlearning (shared by the methods)")
    if settings.difficulty in COMPUTED:
        difficulty = read_difficulty(settings.difficulty, [s.id for s in forget], before)
    train_plan = plan(settings.strategy, masks=masks, threshold=settings.threshold,
                      difficulty=None if difficulty is None else difficulty.to_dict(),
                      reweight_min=settings.reweight_min, reweight_max=settings.reweight_max,
                      order=settings.curriculum_order, focus_every=settings.focus_every)
    if train_plan is not None:
        _write_strategy_table(root, forget, difficulty, train_plan)
    shared: dict[str, pd.DataFrame] = {}

    def retain_before() -> pd.DataFrame:  # only when a method runs, then once
        if "retain" not in shared:
            path = root / "retain_before.parquet"
            if path.exists():
                shared["retain"] = _read(path)
            else:
                with matmul_precision(lm.device, settings.bf16):
                    shared["retain"] = retain_outcomes(lm, retain, settings.eval_batch_size,
                                                       bf16=settings.eval_bf16)
                save_outcomes(shared["retain"], root / "retain_before")
        return shared["retain"]

    rows, deltas = [], {}
    for name in settings.methods:
        table, after, stored, reused = _method(lm, forget, retain, root / name, name, settings,
                                               before, retain_before, progress, train_plan)
        deltas[name] = table["nll_delta"]
        rows.append(_summary(name, table, after, stored, settings.threshold, reused))
    deltas = pd.DataFrame(deltas)
    agreement = None
    if len(settings.methods) > 1:
        agreement = deltas.corr(method="spearman")
        with replacing(root / "agreement_nll_delta.csv") as tmp:
            agreement.to_csv(tmp)
    return UnlearningRun(root, pd.DataFrame(rows), deltas, agreement)


def _strategy_data(lm: LoadedModel, forget, settings: UnlearningSettings):
    """(the manifest's strategy record or None, a difficulty read from a table or None, the
    localize masks or None). A difficulty the run computes (``loss``) is read later, from the
    evaluation before unlearning."""
    request = settings.strategy_request()
    if request is None:
        return None, None, None
    record, difficulty, masks = dict(request), None, None
    ids = [s.id for s in forget]
    if settings.difficulty and settings.difficulty not in COMPUTED:
        difficulty = read_difficulty(settings.difficulty, ids)
        record["difficulty_hash"] = difficulty_hash(difficulty)
    if settings.strategy == "localize":
        from cud.circuits.store import load_circuits
        from cud.unlearning.localize import localize_masks
        circuits = load_circuits(settings.circuits, ids)
        chosen, masks = localize_masks(lm.adapter, circuits.graph, circuits.edge_scores,
                                       circuits.circuits, settings.localize_k)
        record["components"] = chosen
    return record, difficulty, masks


def _write_strategy_table(root: Path, forget, difficulty, train_plan) -> None:
    """``strategy.csv``: per forget sample, its difficulty and what the strategy made of it
    (weight or stage)."""
    table = pd.DataFrame({"id": [s.id for s in forget]}).set_index("id")
    if difficulty is not None:
        table["difficulty"] = difficulty.reindex(table.index)
    if train_plan.weights is not None:
        table["weight"] = pd.Series(train_plan.weights).reindex(table.index)
    if train_plan.stages is not None:
        table["stage"] = pd.Series({i: g for g, group in enumerate(train_plan.stages)
                                    for i in group}).reindex(table.index)
    write_csv(table, root / "strategy.csv")   # ids read back as written


def _method(lm, forget, retain, folder: Path, name: str, settings: UnlearningSettings,
            before: pd.DataFrame, retain_before, progress, train_plan=None):
    """One method's outcomes: read back when this request already ran, else run."""
    request = settings.request(name)
    settings_path = folder / "settings.json"
    stored = _stored_method(folder, name, request)
    if stored is not None:
        if _flag_collapse(stored, settings):   # the budget may have changed since
            write_text(settings_path, json.dumps(stored, indent=1, default=str) + "\n")
        return _read(folder / "outcomes.parquet"), _read(folder / "after.parquet"), stored, True
    folder.mkdir(parents=True, exist_ok=True)
    traj = folder / "trajectory.csv"
    traj.unlink(missing_ok=True)

    def sink(frame, path=traj):
        frame.to_csv(path, mode="a", header=not path.exists(), index=False)

    trained_retain, held = settings.retain_split(name, retain)
    config = settings.train_config(name)
    calibration = None
    if held:
        with matmul_precision(lm.device, settings.bf16):
            calibration = _calibrate(lm, forget, trained_retain, held, folder, name, settings,
                                     request, progress, keep=train_plan is None)
        config = replace(config, lr=calibration.chosen)
    began = time.perf_counter()
    with matmul_precision(lm.device, settings.bf16):
        result = unlearn(lm, forget, trained_retain, method=name,
                         hyperparameter_table=settings.hyperparameters,
                         hyperparameters=settings.method_hyperparameters(name),
                         train_config=config,
                         eval_every=settings.eval_every, forget_threshold=settings.threshold,
                         before=before, evaluate_retain=bool(trained_retain),
                         retain_before=retain_before().reindex(
                             [s.id for s in trained_retain]) if trained_retain else None,
                         trajectory_sink=sink,
                         batch_size=settings.eval_batch_size,
                         generation_budget=settings.generation_budget,
                         metrics=settings.outcome_metrics(),
                         eval_bf16=settings.eval_bf16, progress=progress, plan=train_plan,
                         trained=calibration.trained if calibration is not None else None)
        # a calibration's run at the chosen rate stood for the training: its seconds count
        reused_training = calibration.trained.log.seconds \
            if calibration is not None and calibration.trained is not None else 0.0
        if calibration is not None:
            calibration.trained = None
        if held:
            rise = held_rise(result.model, float(retain_before()["nll"].reindex(
                [s.id for s in held]).mean()), held, settings.eval_batch_size)
    table = result.per_sample()
    save_outcomes(table, folder / "outcomes")
    save_outcomes(result.after, folder / "after")
    stored = dict(result.settings, train_seconds=round(result.log.seconds, 2), model=lm.name,
                  request=request, lr=config.lr)
    if train_plan is not None:
        stored["strategy_steps"] = result.log.stopped_at
    if result.retain_after is not None:
        stored["retain_nll_delta_mean"] = float(
            (result.retain_after["nll"] - result.retain_before["nll"]).mean())
    if calibration is not None:
        stored["calibration"] = calibration.to_dict()
        stored["retain_held_nll_rise"] = rise
    if settings.utility:
        sets = {"general": general_knowledge()}
        if retain:
            sets["retain"] = retain[:settings.utility_samples]
        with matmul_precision(lm.device, settings.bf16):
            stored["utility"] = model_utility(result.model, sets,
                                              batch_size=settings.eval_batch_size,
                                              generation_budget=settings.generation_budget,
                                              bf16=settings.eval_bf16)
    stored["seconds"] = round(time.perf_counter() - began + reused_training, 2)
    record_price(folder.parent, name, stored["seconds"], len(forget),
                 what="training, outcomes after unlearning, retain NLL and utility")
    _flag_collapse(stored, settings)
    if settings.save_model:
        from cud.unlearning.finetune import save_hf_folder
        save_hf_folder(result.model.model, result.model.tokenizer, folder / "model")
    write_text(settings_path, json.dumps(stored, indent=1, default=str) + "\n")
    return table, result.after, stored, False


def _flag_collapse(stored: dict, settings: UnlearningSettings) -> bool:
    """Set ``collapsed`` (and the measure and budget it was judged by) in a method's stored
    settings; True when that changed them. Measured on the held retain part for a calibrated
    method, else on the retain set (which the methods with a retain term train on)."""
    held = stored.get("retain_held_nll_rise")
    rise = held if held is not None else stored.get("retain_nll_delta_mean")
    flags = {"collapsed": is_collapsed(rise, settings.retain_budget),
             "retain_budget": settings.retain_budget,
             "collapse_measure": "held retain part" if held is not None else
             "retain set" if rise is not None else "no retain set: not judged"}
    changed = any(stored.get(k) != v for k, v in flags.items())
    stored.update(flags)
    return changed


def _calibrate(lm, forget, trained_retain, held, folder: Path, name: str,
               settings: UnlearningSettings, request: dict, progress, keep: bool = False):
    """The method's calibration (:func:`cud.unlearning.calibration.calibrate`), each rate's
    rise written to ``calibration.json`` as it is measured, so a killed calibration resumes;
    one made with another request is refused."""
    path = folder / "calibration.json"
    known = _stored_calibration(folder, name, request)

    def write(rate: float, rise: float) -> None:
        known[rate] = rise
        write_text(path, json.dumps({"request": request, "rises": {repr(r): v for r, v in
                                                                   known.items()}},
                                    indent=1) + "\n")

    return calibrate(lm, forget, trained_retain, held, method=name,
                     hyperparameter_table=settings.hyperparameters,
                     hyperparameters=settings.method_hyperparameters(name),
                     train_config=settings.train_config(name), grid=settings.calibration_grid,
                     budget=settings.retain_budget, batch_size=settings.eval_batch_size,
                     known=known, on_rate=write, keep=keep, progress=progress)


def _summary(name, table, after, stored, threshold, reused) -> dict:
    s = spread(table["nll_delta"])
    return {"method": name, **{k: s[k] for k in ("min", "q1", "median", "q3", "max")},
            "forgotten": float((after["prob"] < threshold).mean()),
            "retain_nll_delta": stored.get("retain_nll_delta_mean"),
            "retain_held_rise": stored.get("retain_held_nll_rise"),
            "lr": stored.get("lr", stored.get("train", {}).get("lr")),
            "collapsed": bool(stored.get("collapsed", False)),
            "train_seconds": stored.get("train_seconds"), "reused": reused}


def method_flags(folder: str | Path) -> dict[str, dict]:
    """``{method: {"collapsed", "retain_nll_rise", "collapse_measure", "retain_budget", "lr"}}``
    from an unlearning folder's ``<method>/settings.json`` files (methods without one are left
    out): what the study, the report and the verdict say about each method's outcomes. A
    folder written before methods were flagged is judged here by the default budget."""
    out = {}
    for path in sorted(Path(folder).glob("*/settings.json")):
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(stored, dict) or "method" not in stored:
            continue
        held = stored.get("retain_held_nll_rise")
        rise = held if held is not None else stored.get("retain_nll_delta_mean")
        budget = stored.get("retain_budget", DEFAULT_BUDGET)
        out[path.parent.name] = {
            "collapsed": bool(stored["collapsed"]) if "collapsed" in stored
            else is_collapsed(rise, budget),
            "retain_nll_rise": rise,
            "collapse_measure": stored.get("collapse_measure", "held retain part"
                                           if held is not None else "retain set"),
            "retain_budget": budget,
            "lr": stored.get("lr", stored.get("train", {}).get("lr")),
            "calibrated": "calibration" in stored}
    return out
