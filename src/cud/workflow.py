"""The main job, `cud run` / :func:`cud.run`: the whole pipeline on one configuration.

data -> fine-tune (cached) -> per-sample circuits of the forget set -> unlearning with each
method (ground truth) -> a pilot of each method (a few of its steps) -> baseline metrics ->
anchors on an anchor pool, CUD, held-out validation and the forecast ladder -> structure
analysis -> report. Each stage is the same library function its own command calls, writing into
its own folder under ``config.out`` (``circuits/``, ``unlearning/``, ``pilots/``,
``baselines/``, ``validation/``, ``anchors/``, ``scores/``, ``analysis/``, ``report/``), and
skips work already done with the same settings, so a killed run started again resumes.
``run.json`` records the configuration and the seconds each stage took in this sitting; a run
finished over several sittings with the same configuration keeps each sitting's seconds
(``sittings``) and their per-stage sum (``seconds_all_sittings``), so a resumed stage's few
seconds never hide what it cost when it did its work.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from cud.config import RunConfig, apply, load_config, with_preset
from cud.data.prepare import RunData, load_run_data
from cud.errors import ConfigError, StoreError
from cud.folders import check_out, folder_lock, write_text
from cud.progress import Progress, silent
from cud.tables import write_csv

STAGES = ("data", "model", "circuits", "retest", "unlearning", "pilots", "baselines",
          "validation", "strategy", "analysis", "report")


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
    strategy: pd.DataFrame | None = None     # plain against the strategy, one row per method
    report: Path | None = None


def as_config(config: RunConfig | str | Path | dict | None) -> RunConfig:
    """A :class:`RunConfig` from itself, a config file path, a dict of settings (as in a
    config file, ``preset`` included) or None (the defaults)."""
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, dict):
        base = with_preset(config.get("preset") or "default")
        return apply(base, {k: v for k, v in config.items() if k != "preset"}, "config")
    raise ConfigError(f"expected a RunConfig, a config file or a dict, got "
                      f"{type(config).__name__}")


def _samples_table(samples) -> pd.DataFrame:
    return pd.DataFrame({"id": [s.id for s in samples], "question": [s.question for s in samples],
                         "answer": [s.answer for s in samples]})


def run(config: RunConfig | str | Path | dict | None = None, *,
        progress: Progress | None = None) -> RunResult:
    """Run the whole pipeline (see the module docstring). ``progress``: the one callback of
    :mod:`cud.progress`; each stage reports under its own name, and its steps under theirs."""
    config = as_config(config)
    say = progress or silent
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output path exists and is not a folder")
    check_out(out, {"data": config.data}, "out", writes=("forget.csv", "retain.csv", "run.json")
              + STAGE_FOLDERS)
    with contextlib.ExitStack() as held:
        held.enter_context(folder_lock(out))   # one run at a time in the folder
        return _run(config, out, say, held)


def _run(config: RunConfig, out: Path, say: Progress, held: contextlib.ExitStack
         ) -> RunResult:
    result = RunResult(out=out, config=config)
    clock = _Clock(result, say)

    with clock("data"):
        data = load_run_data(config.data, limit=config.limit,
                             retain_authors=config.retain_authors,
                             forget_fraction=config.forget_fraction, seed=config.seed,
                             text=config.text)
        result.n_forget, result.n_retain = len(data.forget), len(data.retain)

    with clock("model"):
        lm = _model(config, data, say, result)

    # every stage's refusal (other settings, model or data) before anything is written
    _check_stages(config, out, lm, data)
    for stage in _locked_stages(config):   # and no other process writes into them meanwhile
        held.enter_context(folder_lock(out / stage))
    write_csv(_samples_table(data.forget), out / "forget.csv", index=False)  # ids round-trip
    write_csv(_samples_table(data.retain), out / "retain.csv", index=False)
    clock.writing = True
    clock.write(out)

    with clock("circuits"):
        from cud.circuits import find_circuits, load_circuits
        settings = config.stage("circuits")
        reference = None
        if settings.reference:  # the mean ablation's reference set
            from cud.data.prepare import load_samples
            reference = load_samples(settings.reference)
        find_circuits(lm, data.forget, out / "circuits", settings, reference=reference,
                      progress=say)
        cs = load_circuits(out / "circuits", ids=[s.id for s in data.forget])

    retest = None
    if config.retest:
        with clock("retest"):  # the same circuits from independent corrupted prompts
            again = retest_settings(settings, out / "circuits-retest")
            find_circuits(lm, data.forget, out / "circuits-retest", again, reference=reference,
                          progress=lambda task, *rest: say("retest", *rest))
            retest = load_circuits(out / "circuits-retest", ids=[s.id for s in data.forget])

    with clock("unlearning"):
        from cud.difficulty.groundtruth import read_outcomes
        from cud.unlearning.folder import unlearn_to_folder
        settings = config.stage("unlearning")
        result.unlearning = unlearn_to_folder(lm, data.forget, data.retain, out / "unlearning",
                                              settings, progress=say).summary
        outcomes = read_outcomes(out / "unlearning", list(settings.methods))

    if config.pilots.enabled:
        with clock("pilots"):  # each method's own forecast: a few of its steps
            from cud.difficulty.pilot import calibrated_rates, pilots_to_folder
            pilots_to_folder(lm, data.forget, data.retain, out / "pilots", config.pilots,
                             config.stage("unlearning"),
                             rates=calibrated_rates(out / "unlearning"), progress=say)

    baselines = None
    if config.baselines.enabled:
        with clock("baselines"):
            from cud.difficulty.baselines import baselines_to_folder
            baselines = baselines_to_folder(lm, data.forget, out / "baselines",
                                            config.stage("baselines"), progress=say)

    with clock("validation"):
        from cud.difficulty.stage import forecast_inputs, validate_to_folder
        forecast = forecast_inputs(
            circuits=out / "circuits", unlearning=out / "unlearning",
            baselines=out / "baselines" if config.baselines.enabled else None,
            pilots=out / "pilots" if config.pilots.enabled else None)
        study = validate_to_folder(cs, outcomes, out / "validation", config.stage("study"),
                                   baselines=baselines, anchors_out=out / "anchors",
                                   scores_out=out / "scores", retest=retest,
                                   forecast=forecast, progress=say)
        result.heldout = study.heldout

    if config.strategy != "plain":
        with clock("strategy"):  # the chosen strategy after the plain methods, compared
            result.strategy = _strategy(config, lm, data, out, say)

    if config.study.split_method:
        with clock("split"):  # METHOD §8: unlearn the CUD-easy and CUD-hard halves apart
            from cud.difficulty.split import split_protocol_to_folder
            split_protocol_to_folder(lm, study, data.forget, data.retain, out / "validation",
                                     method=config.study.split_method,
                                     hyperparameter_table=config.unlearning.hyperparameters,
                                     progress=say)

    with clock("analysis"):
        from cud.analysis.stage import analyze_to_folder
        main = study.anchors["main"]
        analysis = analyze_to_folder(cs.subset(list(study.metrics.index)), out / "analysis",
                                     config.analysis,
                                     anchors={"easy": list(main.easy), "hard": list(main.hard)},
                                     cud=study.metrics["cud"].astype(float), outcomes=outcomes)
        summary = analysis.summary()
        result.structure = summary if isinstance(summary, dict) else {"summary": str(summary)}

    if config.report.enabled:
        with clock("report"):
            result.report = _report(config, out, data, say)
    clock.write(out)
    return result


def _check_stages(config: RunConfig, out: Path, lm, data: RunData) -> None:
    """Whatever a stage would refuse in ``out`` (results of other settings, another model or
    other data), found before any stage writes, so a refused run changes no file."""
    from cud.circuits.pipeline import check_circuit_folder
    from cud.unlearning.folder import check_unlearning_folder
    for stage in STAGE_FOLDERS:
        if (out / stage).exists() and not (out / stage).is_dir():
            raise ConfigError(f"{out / stage}: exists and is not a folder; use another out")
    circuits = config.stage("circuits")
    check_circuit_folder(lm, out / "circuits", circuits)
    if config.retest:
        check_circuit_folder(lm, out / "circuits-retest",
                             retest_settings(circuits, out / "circuits-retest"))
    unlearning = config.stage("unlearning")
    check_unlearning_folder(lm, data.forget, data.retain, out / "unlearning", unlearning)
    if config.pilots.enabled:
        from cud.difficulty.pilot import calibrated_rates, check_pilots_folder
        check_pilots_folder(lm, data.forget, data.retain, out / "pilots", config.pilots,
                            unlearning, rates=calibrated_rates(out / "unlearning"))


#: the stage folders of a run (the circuits folders take their own short lock, shared with
#: the workers of a distributed run)
STAGE_FOLDERS = ("circuits", "circuits-retest", "unlearning", "pilots", "baselines",
                 "validation", "anchors", "scores", "analysis", "report")


def _locked_stages(config: RunConfig) -> list[str]:
    """The stage folders this run writes into, locked for the whole run."""
    skip = {"pilots": not config.pilots.enabled, "baselines": not config.baselines.enabled,
            "report": not config.report.enabled}
    return [s for s in STAGE_FOLDERS if not s.startswith("circuits") and not skip.get(s)]


class _Clock:
    """Times each stage, reports its start and end, and keeps ``run.json`` up to date (once
    every stage's folder has been checked: a refused run leaves it as it was)."""

    def __init__(self, result: RunResult, say: Progress):
        self.result, self.say = result, say
        self.earlier = _earlier_sittings(result.out / "run.json", result.config)
        self.writing = False

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
                    if clock.writing:
                        clock.write(clock.result.out)
                return False

        return _Stage()

    def write(self, out: Path) -> None:
        r = self.result
        sittings = self.earlier + [dict(r.seconds)]
        every: dict[str, float] = {}
        for sitting in sittings:
            for stage, seconds in sitting.items():
                every[stage] = round(every.get(stage, 0.0) + float(seconds), 2)
        write_text(out / "run.json", json.dumps({
            "config": r.config.to_dict(), "seconds": r.seconds,
            "total_seconds": round(sum(r.seconds.values()), 2),
            "sittings": sittings, "seconds_all_sittings": every,
            "total_seconds_all_sittings": round(sum(every.values()), 2),
            "n_forget": r.n_forget, "n_retain": r.n_retain, "model_path": r.model_path},
            indent=1, default=str) + "\n")


def retest_settings(circuits, folder: Path | None = None):
    """The second measurement of the circuits (``circuits-retest/``): the same settings with
    independent corrupted prompts (seed + 1) and no faithfulness passes, which only the first
    measurement's variants and report read (the retest compares scores and circuits, which the
    passes do not change). A ``folder`` started before, with the passes, is resumed with them."""
    from cud.circuits.store import stored_settings
    again = replace(circuits, seed=circuits.seed + 1)
    try:
        made = stored_settings(folder) if folder is not None else {}
    except StoreError:   # the stage's own check names what is wrong with the folder
        made = {}
    if made.get("faithfulness") and tuple(made.get("faithfulness_sizes") or ()) \
            == tuple(again.faithfulness_sizes) and again.faithfulness:
        return again
    return replace(again, faithfulness=False, faithfulness_sizes=())


def _earlier_sittings(path: Path, config: RunConfig) -> list[dict[str, float]]:
    """The stage seconds of earlier sittings of this run from its ``run.json``: none when there
    is none, it cannot be read, or it was written with another configuration (a rerun with
    other settings starts its own account)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    same = json.loads(json.dumps(config.to_dict(), default=str))
    if not isinstance(old, dict) or old.get("config") != same:
        return []
    sittings = old.get("sittings")
    if sittings is None:  # written before sittings were kept: its seconds are one sitting
        sittings = [old.get("seconds") or {}]
    return [{str(k): float(v) for k, v in s.items()} for s in sittings if isinstance(s, dict)]


def _model(config: RunConfig, data: RunData, say: Progress, result: RunResult):
    from cud.models import load_model
    settings = config.stage("finetune")
    if not settings.enabled:
        result.model_path = config.model
        return load_model(config.model, device=config.device, dtype=config.dtype)
    from cud.unlearning.finetune import finetune
    ft = finetune(config.model, data.taught, settings, device=config.device, keep_model=True,
                  progress=say)
    result.model_path = str(ft.path)
    lm = ft.model
    if config.dtype is not None:
        from cud.models.loading import pick_dtype
        lm.model.to(pick_dtype(config.dtype, lm.device))
    return lm


def strategy_folder(config: RunConfig) -> Path:
    return Path(config.out) / f"strategy-{config.strategy}"


def _strategy(config: RunConfig, lm, data: RunData, out: Path, say: Progress) -> pd.DataFrame:
    """Unlearn with ``config.strategy`` into its own folder and compare it with plain."""
    from cud.unlearning.compare import compare_to_folder
    from cud.unlearning.folder import unlearn_to_folder
    from cud.unlearning.strategies import NEEDS_DIFFICULTY, read_difficulty
    source = config.strategy_difficulty
    if source == "cud":
        source = f"{out / 'scores' / 'scores.parquet'}:cud"
    ids = [s.id for s in data.forget]
    before = pd.read_parquet(out / "unlearning" / "before.parquet")
    before = before.set_index("id") if "id" in before.columns else before
    difficulty = read_difficulty(source, ids, before)
    plain = config.stage("unlearning")
    settings = replace(plain, strategy=config.strategy,
                       difficulty=source if config.strategy in NEEDS_DIFFICULTY else None,
                       circuits=str(out / "circuits") if config.strategy == "localize"
                       else None)
    folder = strategy_folder(config)
    unlearn_to_folder(lm, data.forget, data.retain, folder, settings, progress=say)
    return compare_to_folder(out / "unlearning", folder, list(settings.methods), difficulty,
                             settings.threshold, config.strategy)


def _report(config: RunConfig, out: Path, data: RunData, say: Progress) -> Path:
    from cud.report.html import build_report
    from cud.report.inputs import load_report_inputs
    inputs = load_report_inputs(circuits=out / "circuits", cud=out / "scores",
                                distance=config.study.distance, anchors=out / "anchors",
                                unlearn=out / "unlearning",
                                methods=list(config.unlearning.methods),
                                baselines=out / "baselines" if config.baselines.enabled
                                else None, validation=out / "validation",
                                strategy=strategy_folder(config) / "comparison.csv"
                                if config.strategy != "plain" else None)
    inputs.samples = _samples_table(data.forget).set_index("id")
    report = build_report(inputs, out / "report", title=config.report.title,
                          outcomes=config.report.outcomes,
                          n_extremes=config.report.n_extremes, progress=say)
    return Path(report.html)
