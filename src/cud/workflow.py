"""The main job, `cud run` / :func:`cud.run`: the whole pipeline on one configuration.

data -> fine-tune (cached) -> per-sample circuits of the forget set -> unlearning with each
method (ground truth) -> baseline metrics -> anchors on an anchor pool, CUD, held-out validation
-> structure analysis -> report. Each stage writes into its own folder under ``config.out``,
the same folder its stage command writes (``circuits/``, ``unlearning/``, ``baselines/``,
``anchors/``, ``scores/``, ``validation/``, ``analysis/``, ``report/``), and skips work already
done with the same settings, so a killed run started again resumes. ``run.json`` records the
configuration and the seconds each stage took.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from cud.config import RunConfig, load_config
from cud.data.formats import load_qa
from cud.data.samples import QASample
from cud.errors import ConfigError, DataError

#: progress(stage, done, total, info): total None while a stage's size is unknown
Progress = Callable[[str, int, "int | None", str], None]

STAGES = ("data", "model", "circuits", "unlearning", "baselines", "validation", "analysis",
          "report")


@dataclass
class RunResult:
    out: Path
    config: RunConfig
    seconds: dict[str, float] = field(default_factory=dict)
    n_forget: int = 0
    n_retain: int = 0
    model_path: str = ""
    unlearning: pd.DataFrame | None = None   # one summary row per method
    heldout: pd.DataFrame | None = None      # the held-out validation table
    structure: dict | None = None            # the structure analysis summary
    report: Path | None = None


def load_forget_retain(config: RunConfig) -> tuple[list[QASample], list[QASample]]:
    """The forget and retain sets of a run (see :func:`load_run_data`)."""
    forget, retain, _ = load_run_data(config)
    return forget, retain


def load_run_data(config: RunConfig
                  ) -> tuple[list[QASample], list[QASample], list[QASample]]:
    """The forget set, the retain set and everything the model is taught (both, in the data's
    own order, so fine-tuning shares its cache with ``cud finetune --data`` on the same data).

    ``tofu:FOLDER[:FORGET[:RETAIN]]`` reads TOFU's files from a local folder (default splits
    ``forget10`` and ``retain90``; the forget split's ``_perturbed`` file is used when present,
    for the truth ratio); ``config.limit`` caps each set. Any other spec is one QA set split by
    author (the id's part before the first '.') into forget and retain.
    """
    from cud.unlearning import add_perturbed_answers, split_forget_retain
    from cud.unlearning.outcomes import has_perturbations

    spec = config.data
    if spec.startswith("tofu:"):
        parts = spec[len("tofu:"):].split(":")
        folder = Path(parts[0])
        forget_name = parts[1] if len(parts) > 1 and parts[1] else "forget10"
        retain_name = parts[2] if len(parts) > 2 and parts[2] else "retain90"
        if not folder.is_dir():
            raise DataError("no such TOFU folder (expected tofu:FOLDER[:FORGET[:RETAIN]])",
                            file=str(folder))
        forget_file = folder / f"{forget_name}_perturbed.json"
        if not forget_file.exists():
            forget_file = folder / f"{forget_name}.json"
        forget = load_qa(forget_file, limit=config.limit)
        retain = load_qa(folder / f"{retain_name}.json", limit=config.limit)
        if not any(has_perturbations(s) for s in forget):
            forget = add_perturbed_answers(forget + retain)[:len(forget)]
        return forget, retain, forget + retain
    samples = load_qa(spec, limit=config.limit)
    if not any(has_perturbations(s) for s in samples):
        samples = add_perturbed_answers(samples)
    forget, retain = split_forget_retain(samples, config.unlearning.forget_fraction,
                                         seed=config.seed)
    return forget, retain, samples


def _samples_table(samples: Sequence[QASample]) -> pd.DataFrame:
    return pd.DataFrame({"id": [s.id for s in samples], "question": [s.question for s in samples],
                         "answer": [s.answer for s in samples]})


def run(config: RunConfig | str | Path | dict | None = None, *,
        progress: Progress | None = None) -> RunResult:
    """Run the whole pipeline. ``config``: a :class:`RunConfig`, a config file path, a dict of
    settings (as in a config file), or None for the defaults."""
    if config is None:
        config = RunConfig()
    elif isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = _from_dict(config)
    check(config)
    say = progress or (lambda *_: None)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output path exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    result = RunResult(out=out, config=config)
    clock = _Clock(result, out, config, say)

    with clock("data"):
        forget, retain, taught = load_run_data(config)
        result.n_forget, result.n_retain = len(forget), len(retain)
        _samples_table(forget).to_csv(out / "forget.csv", index=False)
        _samples_table(retain).to_csv(out / "retain.csv", index=False)

    with clock("model"):
        lm = _model(config, taught, say, result)

    with clock("circuits"):
        cs = _circuits(config, lm, forget, out / "circuits", say)

    with clock("unlearning"):
        from cud.unlearning.folder import unlearn_to_folder
        u = config.unlearning
        changes = {"max_steps": u.max_steps} if u.max_steps else {}
        result.unlearning = unlearn_to_folder(
            lm, forget, retain, u.methods, out / "unlearning", preset=u.preset,
            train_changes=changes, eval_every=u.eval_every, utility=u.utility,
            progress=lambda m, s, t, row: say("unlearning", s, t, m))

    baselines = None
    if config.baselines.enabled:
        with clock("baselines"):
            baselines = _baselines(config, lm, forget, out / "baselines", say)

    with clock("validation"):
        study = _validation(config, cs, out, baselines, say)
        result.heldout = study.heldout

    with clock("analysis"):
        result.structure = _analysis(config, out, study)

    if config.report.enabled:
        with clock("report"):
            result.report = _report(config, out, forget, say)
    clock.write()
    return result


def check(config: RunConfig) -> None:
    """Every stage's settings, checked before the first stage starts (a bad value deep in a
    config file fails now, not after fine-tuning)."""
    from cud.circuits.attribution import AttributionSettings
    from cud.circuits.pipeline import CircuitSettings
    from cud.circuits.selection import SelectionSettings
    from cud.difficulty.study import StudySettings
    from cud.unlearning import METHODS, PRESETS
    c, u, s = config.circuits, config.unlearning, config.study
    CircuitSettings(attribution=AttributionSettings(method=c.method, steps=c.steps,
                                                    metric=c.metric),
                    selection=SelectionSettings(selection=c.selection, n_edges=c.n_edges,
                                                threshold=c.threshold),
                    baseline=c.baseline if c.baseline != "mean" else "corrupt")
    if c.baseline == "mean":
        raise ConfigError("circuits.baseline: cud run supports 'zero' and 'corrupt'; for "
                          "'mean' run `cud circuits --baseline mean --reference DATA`")
    if c.batch_size < 1:
        raise ConfigError(f"circuits.batch_size must be at least 1, got {c.batch_size}")
    if not u.methods:
        raise ConfigError("unlearning.methods: give at least one method")
    for m in u.methods:
        if m not in METHODS:
            raise ConfigError(f"unlearning.methods: unknown method '{m}' "
                              f"(choose from {', '.join(METHODS)})")
    if u.preset not in PRESETS:
        raise ConfigError(f"unlearning.preset: unknown preset '{u.preset}' "
                          f"(choose from {', '.join(PRESETS)})")
    if not 0 < u.forget_fraction < 1:
        raise ConfigError(f"unlearning.forget_fraction must be in (0, 1), got "
                          f"{u.forget_fraction}")
    if config.limit is not None and config.limit < 1:
        raise ConfigError(f"limit must be at least 1, got {config.limit}")
    StudySettings(k=s.k, vote=s.vote, pool_fraction=s.pool_fraction, distance=s.distance,
                  weighted=s.weighted, sizes=s.sizes, n_boot=s.n_boot, predictor=s.predictor)
    if s.k < 1:
        raise ConfigError(f"study.k must be at least 1, got {s.k}")


def _from_dict(data: dict[str, Any]) -> RunConfig:
    from cud.config import apply, with_preset
    config = with_preset(data.get("preset") or "default")
    return apply(config, {k: v for k, v in data.items() if k != "preset"}, "config")


class _Clock:
    """Times each stage, reports its start and end, and keeps ``run.json`` up to date."""

    def __init__(self, result: RunResult, out: Path, config: RunConfig, say: Progress):
        self.result, self.out, self.config, self.say = result, out, config, say

    def __call__(self, stage: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()
                clock.say(stage, 0, None, "started")

            def __exit__(self, kind, value, tb):
                seconds = time.perf_counter() - self.start
                if kind is None:
                    clock.result.seconds[stage] = round(seconds, 2)
                    clock.say(stage, 1, 1, f"done in {seconds:.1f} s")
                    clock.write()
                return False

        return _Stage()

    def write(self) -> None:
        r = self.result
        (self.out / "run.json").write_text(json.dumps({
            "config": self.config.to_dict(), "seconds": r.seconds,
            "total_seconds": round(sum(r.seconds.values()), 2), "n_forget": r.n_forget,
            "n_retain": r.n_retain, "model_path": r.model_path}, indent=1, default=str) + "\n")


def _model(config: RunConfig, taught, say: Progress, result: RunResult):
    from cud.models import load_model
    f = config.finetune
    if not f.enabled:
        result.model_path = config.model
        return load_model(config.model, device=config.device, dtype=config.dtype)
    from dataclasses import replace
    from cud.unlearning.finetune import FinetuneConfig, default_train_config, finetune
    train = default_train_config()
    changes = {k: v for k, v in dict(lr=f.lr, epochs=f.epochs, batch_size=f.batch_size,
                                     seed=config.seed).items() if v is not None}
    ft = finetune(config.model, list(taught),
                  config=FinetuneConfig(train=replace(train, **changes), lora=f.lora),
                  cache_dir=f.cache_dir, device=config.device, keep_model=True,
                  progress=lambda s, t, row: say("model", s, t, f"fine-tuning, loss "
                                                               f"{row['loss']:.3f}"))
    result.model_path = str(ft.path)
    lm = ft.model
    if config.dtype is not None:
        from cud.models.loading import pick_dtype
        lm.model.to(pick_dtype(config.dtype, lm.device))
    return lm


def _circuits(config: RunConfig, lm, forget, folder: Path, say: Progress):
    from cud.circuits.attribution import AttributionSettings
    from cud.circuits.pipeline import CircuitSettings, find_circuits
    from cud.circuits.selection import SelectionSettings
    from cud.runtime.store import load_circuits
    c = config.circuits
    if c.baseline == "mean":
        raise ConfigError("cud run supports the zero and corrupt baselines; for 'mean' run "
                          "`cud circuits --baseline mean --reference DATA`")
    settings = CircuitSettings(
        attribution=AttributionSettings(method=c.method, steps=c.steps, metric=c.metric),
        selection=SelectionSettings(selection=c.selection, n_edges=c.n_edges,
                                    threshold=c.threshold),
        baseline=c.baseline, seed=config.seed, faithfulness=c.faithfulness)
    find_circuits(lm, forget, folder, settings, batch_size=c.batch_size,
                  progress=lambda d, t, info: say("circuits", d, t, ""))
    return load_circuits(folder, ids=[s.id for s in forget])


def _baselines(config: RunConfig, lm, forget, folder: Path, say: Progress) -> pd.DataFrame:
    from cud.difficulty.baselines import baseline_metrics
    from cud.unlearning.outcomes import save_table
    b = config.baselines
    table = baseline_metrics(lm, forget, metrics=b.metrics, mrd_k=b.mrd_k,
                             mrd_sigma=b.mrd_sigma, seed=config.seed, work_dir=folder / ".work",
                             progress=lambda name, d, t: say("baselines", d, t, name))
    save_table(table, folder / "baselines")
    return table


def _write(df: pd.DataFrame, path: Path, index: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path.with_suffix(".parquet"), index=index)
    df.to_csv(path.with_suffix(".csv"), index=index)


def _validation(config: RunConfig, cs, out: Path, baselines, say: Progress):
    from cud.difficulty.anchors import anchor_circuits, selection_of
    from cud.difficulty.groundtruth import read_outcomes
    from cud.difficulty.score import score_samples
    from cud.difficulty.study import StudySettings, run_study
    s = config.study
    settings = StudySettings(k=s.k, vote=s.vote, pool_fraction=s.pool_fraction, seed=config.seed,
                             distance=s.distance, weighted=s.weighted, sizes=s.sizes,
                             n_boot=s.n_boot, predictor=s.predictor)
    tables = read_outcomes(out / "unlearning", list(config.unlearning.methods))
    selection = selection_of(cs.settings)
    study = run_study(cs.ids, cs.edge_scores, cs.graph, selection, tables, baselines=baselines,
                      circuits=cs.circuits, settings=settings, circuit_settings=cs.settings,
                      progress=lambda name, d, t: say("validation", d, t, name))
    ac = anchor_circuits(study.anchors["main"], cs.ids, cs.edge_scores, cs.graph, selection,
                         circuit_settings=cs.settings)
    ac.save(out / "anchors")
    scores = score_samples(cs.ids, cs.edge_scores, ac, distance_name=s.distance,
                           weighted=s.weighted, circuits=cs.circuits, selection=selection)
    _write(scores, out / "scores" / "scores")
    folder = out / "validation"
    _write(study.heldout, folder / "heldout")
    if not study.cross_method.empty:
        _write(study.cross_method, folder / "cross_method")
    _write(study.robustness, folder / "robustness")
    _write(study.metrics, folder / "metrics", index=True)
    for name, matrix in study.agreement.items():
        matrix.to_csv(folder / f"agreement_{name}.csv")
    (folder / "study.json").write_text(json.dumps({
        "settings": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in settings.__dict__.items()},
        "anchors": {n: a.to_dict() for n, a in study.anchors.items()},
        "held_out": study.held_out, "excluded": study.excluded,
        "predictor": study.predictor}, indent=1, default=str) + "\n")
    return study


def _analysis(config: RunConfig, out: Path, study) -> dict:
    from cud.analysis import analyze_structure
    from cud.circuits.structure import structure_statistics
    from cud.difficulty.groundtruth import difficulty, read_outcomes
    from cud.runtime.store import load_circuits
    cs = load_circuits(out / "circuits", ids=list(study.metrics.index))
    stats = structure_statistics(cs.graph, cs.circuits.numpy(), ids=cs.ids)
    tables = read_outcomes(out / "unlearning", list(config.unlearning.methods))
    difficulties = {f"{m} {o}": difficulty(t, o, source=m)
                    for o in ("nll_after", "nll_delta") for m, t in tables.items()}
    main = study.anchors["main"]
    result = analyze_structure(stats, anchors={"easy": list(main.easy), "hard": list(main.hard)},
                               cud=study.metrics["cud"].astype(float),
                               difficulties=difficulties)
    result.save(out / "analysis")
    summary = result.summary()
    return summary if isinstance(summary, dict) else {"summary": str(summary)}


def _report(config: RunConfig, out: Path, forget, say: Progress) -> Path:
    from cud.report.html import build_report
    from cud.report.inputs import load_report_inputs
    inputs = load_report_inputs(circuits=out / "circuits", cud=out / "scores",
                                distance=config.study.distance, anchors=out / "anchors",
                                unlearn=out / "unlearning",
                                methods=list(config.unlearning.methods),
                                baselines=out / "baselines" if config.baselines.enabled
                                else None)
    inputs.samples = _samples_table(forget).set_index("id")
    report = build_report(inputs, out / "report", title=config.report.title)
    return Path(report.html)
