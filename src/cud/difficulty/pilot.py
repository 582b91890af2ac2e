"""The pilot stage (`cud pilot`, the pilots stage of `cud run`): a difficulty forecast made by
the unlearning method itself, at a price the user can see.

Method M is run on the whole forget set with the full run's hyperparameters, learning-rate
schedule and seed, and stopped early (:func:`cud.unlearning.pilot.pilot`); each sample's
teacher-forced NLL rise after a fraction f of M's steps is its score ``pilot_<f %>`` for M
(higher = more forgotten so far; the study reads the direction from the anchors, as it does for
every baseline). One pilot records every fraction of ``fractions`` on its way to the largest, so
the forecast's quality can be read against its price. A calibrated method
(``[unlearning] calibrate``) is piloted at its calibrated rate on the retain samples it trains
on, i.e. exactly the run whose outcome it forecasts. Folder layout::

    pilots.json                 which model and forget set the folder is for
    <method>/scores.parquet/csv the NLL rise of every sample at every fraction (index id)
    <method>/trajectory.csv     step, id, nll at step 0 and at each fraction's step
    <method>/settings.json      the request, each fraction's step and seconds (per sample too)

Resumable like the unlearning stage: a method already piloted with the same request is read
back; a folder of another model or forget set, or a method piloted with other settings, is
refused (never mixed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from cud.data.samples import QASample
from cud.errors import ConfigError, DataError, StoreError
from cud.folders import folder_lock, stored_request, write_text
from cud.models.fingerprint import model_fingerprint
from cud.models.loading import LoadedModel
from cud.models.precision import matmul_precision
from cud.progress import Progress
from cud.tables import save_table
from cud.unlearning.folder import UnlearningSettings, samples_hash
from cud.unlearning.methods import METHODS
from cud.unlearning.pilot import check_fractions, pilot, pilot_name

MANIFEST = "pilots.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PilotSettings:
    """The pilots (`cud pilot`, ``[pilots]`` of `cud run`). ``fractions``: shares of the
    method's optimizer steps at which the NLL rise is read (one run, stopped at the largest);
    ``methods``: which methods to pilot (empty: every method of the unlearning stage);
    ``enabled``: whether `cud run` runs them. On by default: a pilot trains for at most the
    largest fraction of one method's steps and evaluates only teacher-forced NLL at a few steps,
    while the full run it forecasts also generates greedy answers and truth ratios before and
    after; on the default run the pilots add about a tenth of the unlearning stage."""

    enabled: bool = True
    fractions: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    methods: tuple[str, ...] = ()

    def __post_init__(self):
        check_fractions(self.fractions)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"pilots.methods: unknown method(s) {', '.join(unknown)} "
                              f"(choose from {', '.join(METHODS)})")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PilotRun:
    """What :func:`pilots_to_folder` did: per method the scores (index id, one column per
    fraction), the seconds per sample of each score, its step, and whether it was read back."""

    root: Path
    scores: dict[str, pd.DataFrame] = field(default_factory=dict)
    prices: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: dict[str, dict[str, int]] = field(default_factory=dict)
    total_steps: dict[str, int] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        rows = []
        for m, prices in self.prices.items():
            for name, price in prices.items():
                rows.append({"method": m, "score": name, "step": self.steps[m][name],
                             "of_steps": self.total_steps[m], "seconds_per_sample": price,
                             "reused": self.reused[m]})
        return pd.DataFrame(rows)


def _manifest(lm: LoadedModel, forget: Sequence[QASample]) -> dict:
    return {"kind": "cud-pilots", "format_version": FORMAT_VERSION, "model": lm.name,
            "model_fingerprint": model_fingerprint(lm), "forget": samples_hash(forget),
            "n_forget": len(forget)}


def _check_manifest(root: Path, manifest: dict) -> bool:
    """Whether ``root`` has a manifest; refuses one of another model or forget set."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: output path exists and is not a folder")
    path = root / MANIFEST
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable ({e}); use another --out folder") from None
    if old.get("kind") != "cud-pilots" or old.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: not a cud pilots folder of format {FORMAT_VERSION}")
    differ = [k for k in ("model_fingerprint", "forget") if old.get(k) != manifest[k]]
    if differ:
        what = {"model_fingerprint": "another model", "forget": "another forget set"}
        raise StoreError(f"{root}: holds pilots of {', '.join(what[k] for k in differ)}; "
                         f"use another --out folder so old and new results do not mix")
    return True


def _open(root: Path, lm: LoadedModel, forget: Sequence[QASample]) -> None:
    manifest = _manifest(lm, forget)
    if not _check_manifest(root, manifest):
        root.mkdir(parents=True, exist_ok=True)
        write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _requests(settings: PilotSettings, unlearning: UnlearningSettings,
              retain: Sequence[QASample], rates: Mapping[str, float] | None, *,
              known_rates: bool = True) -> dict[str, tuple]:
    """``{method: (train config, trained retain, request)}`` of every method piloted; a
    calibrated method without its rate is refused (``known_rates``) or left out."""
    fractions = check_fractions(settings.fractions)
    out = {}
    for name in settings.methods or unlearning.methods:
        config = unlearning.train_config(name)
        if name in unlearning.calibrate:
            if not rates or name not in rates:
                if not known_rates:
                    continue
                raise ConfigError(f"{name} is calibrated: pilot it after the unlearning stage "
                                  f"has chosen its rate (or give the rate with --lr)")
            config = replace(config, lr=float(rates[name]))
        trained_retain, _ = unlearning.retain_split(name, retain)
        request = {"method": name, "table": unlearning.hyperparameters,
                   "hyperparameters": unlearning.method_hyperparameters(name),
                   "train": config.to_dict(), "fractions": list(fractions),
                   "retain": samples_hash(trained_retain),
                   "eval_batch_size": unlearning.eval_batch_size}
        out[name] = (config, trained_retain, request)
    return out


def _stored(folder: Path, name: str, request: dict) -> dict | None:
    """The stored settings of ``name``'s pilot made with ``request`` (None when there is
    none); refuses a pilot of another request."""
    if not (folder / "scores.parquet").exists():
        return None
    return stored_request(folder / "settings.json", request, folder, f"a {name} pilot")


def check_pilots_folder(lm: LoadedModel, forget: Sequence[QASample],
                        retain: Sequence[QASample], out: str | Path,
                        settings: PilotSettings = PilotSettings(),
                        unlearning: UnlearningSettings = UnlearningSettings(), *,
                        rates: Mapping[str, float] | None = None) -> None:
    """What :func:`pilots_to_folder` would refuse, found without writing anything (`cud run`
    checks every stage before any writes); a calibrated method whose rate is not known yet is
    checked when it is piloted."""
    root = Path(out)
    _check_manifest(root, _manifest(lm, list(forget)))
    for name, (_, _, request) in _requests(settings, unlearning, list(retain), rates,
                                           known_rates=False).items():
        _stored(root / name, name, request)


def pilots_to_folder(lm: LoadedModel, forget: Sequence[QASample], retain: Sequence[QASample],
                     out: str | Path, settings: PilotSettings = PilotSettings(),
                     unlearning: UnlearningSettings = UnlearningSettings(), *,
                     rates: Mapping[str, float] | None = None,
                     progress: Progress | None = None) -> PilotRun:
    """Pilot each method (``settings.methods``, else ``unlearning.methods``) with the settings
    the unlearning stage runs it with (``unlearning``; ``rates``: a calibrated method's rate,
    see :func:`calibrated_rates`), written under ``out`` (created or resumed)."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: output path exists and is not a folder")
    with folder_lock(root):
        return _pilots_to_folder(lm, list(forget), list(retain), root, settings, unlearning,
                                 rates, progress)


def _pilots_to_folder(lm, forget, retain, root: Path, settings: PilotSettings,
                      unlearning: UnlearningSettings, rates, progress) -> PilotRun:
    _open(root, lm, forget)
    fractions = check_fractions(settings.fractions)
    run = PilotRun(root)
    for name, (config, trained_retain, request) in _requests(settings, unlearning, retain,
                                                             rates).items():
        folder = root / name
        stored_path = folder / "settings.json"
        stored = _stored(folder, name, request)
        if stored is not None:
            scores = pd.read_parquet(folder / "scores.parquet")
            run.reused[name] = True
        else:
            folder.mkdir(parents=True, exist_ok=True)
            traj = folder / "trajectory.csv"
            traj.unlink(missing_ok=True)

            def sink(frame, path=traj):
                frame.to_csv(path, mode="a", header=not path.exists(), index=False)

            with matmul_precision(lm.device, unlearning.bf16):
                result = pilot(lm, forget, trained_retain, method=name, fractions=fractions,
                               hyperparameter_table=unlearning.hyperparameters,
                               hyperparameters=unlearning.method_hyperparameters(name),
                               train_config=config, batch_size=unlearning.eval_batch_size,
                               progress=progress, trajectory_sink=sink)
            scores = result.rise
            save_table(scores, folder / "scores")
            n = len(forget)
            stored = {"method": name, "model": lm.name, "request": request,
                      "total_steps": result.total_steps,
                      "steps": {pilot_name(f): k for f, k in result.steps.items()},
                      "seconds": {pilot_name(f): round(v, 4) for f, v in result.seconds.items()},
                      "seconds_per_sample": {pilot_name(f): v / n
                                             for f, v in result.seconds.items()},
                      "n_forget": n, "hyperparameters": result.hyperparameters}
            write_text(stored_path, json.dumps(stored, indent=1, default=str) + "\n")
            run.reused[name] = False
        if "id" in scores.columns:
            scores = scores.set_index("id")
        scores.index = scores.index.astype(str)
        run.scores[name] = scores
        run.prices[name] = {k: float(v) for k, v in stored["seconds_per_sample"].items()}
        run.steps[name] = {k: int(v) for k, v in stored["steps"].items()}
        run.total_steps[name] = int(stored["total_steps"])
    return run


def calibrated_rates(unlearning_folder: str | Path | None) -> dict[str, float]:
    """``{method: rate}`` of the calibrated methods of an unlearning folder (the rate each was
    run at, ``<method>/settings.json``)."""
    if unlearning_folder is None:
        return {}
    out = {}
    for path in sorted(Path(unlearning_folder).glob("*/settings.json")):
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(stored, dict) and "calibration" in stored and "lr" in stored:
            out[path.parent.name] = float(stored["lr"])
    return out


def read_pilots(folder: str | Path) -> PilotRun:
    """A pilots folder written by :func:`pilots_to_folder`, read back (every method in it)."""
    root = Path(folder)
    if not (root / MANIFEST).is_file():
        raise DataError("not a pilots folder (no pilots.json); run `cud pilot` first",
                        file=str(root))
    run = PilotRun(root)
    for path in sorted(root.glob("*/settings.json")):
        name = path.parent.name
        try:
            stored = json.loads(path.read_text())
            scores = pd.read_parquet(path.parent / "scores.parquet")
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable pilot ({e})", file=str(path.parent)) from None
        if "id" in scores.columns:
            scores = scores.set_index("id")
        scores.index = scores.index.astype(str)
        run.scores[name] = scores
        run.prices[name] = {k: float(v) for k, v in stored["seconds_per_sample"].items()}
        run.steps[name] = {k: int(v) for k, v in stored["steps"].items()}
        run.total_steps[name] = int(stored["total_steps"])
        run.reused[name] = True
    if not run.scores:
        raise DataError("the pilots folder holds no finished pilot", file=str(root))
    return run
