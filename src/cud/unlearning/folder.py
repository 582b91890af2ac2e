"""Unlearning runs written to a folder, one sub-folder per method (the layout `cud unlearn`
writes and :func:`cud.difficulty.groundtruth.read_outcomes` reads)::

    before.parquet/.csv            forget-set outcomes of the model before unlearning
    <method>/outcomes.parquet/.csv per-sample deltas and steps to forget
    <method>/after.parquet/.csv    forget-set outcomes after unlearning
    <method>/trajectory.csv        per-sample NLL every k steps (with eval_every)
    <method>/settings.json         the method's settings, training time, retain NLL change, utility
    agreement_nll_delta.csv        Spearman agreement of the methods' NLL increases

A method whose ``settings.json`` and ``outcomes.parquet`` exist with the same requested settings
is not run again.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from cud.data.samples import QASample
from cud.models.loading import LoadedModel
from cud.unlearning.general import general_knowledge
from cud.unlearning.outcomes import evaluate_outcomes, model_utility, save_table
from cud.unlearning.presets import preset as get_preset
from cud.unlearning.run import DEFAULT_FORGET_THRESHOLD, spread, unlearn

Progress = Callable[[str, int, int, dict], None]


def unlearn_to_folder(lm: LoadedModel, forget: Sequence[QASample], retain: Sequence[QASample],
                      methods: Sequence[str], out: str | Path, *, preset: str = "quick",
                      train_changes: dict | None = None, eval_every: int | None = None,
                      threshold: float = DEFAULT_FORGET_THRESHOLD, utility: bool = True,
                      progress: Progress | None = None) -> pd.DataFrame:
    """Run each method on a copy of ``lm`` and write its outcomes under ``out``. Returns one
    summary row per method (NLL-increase quartiles, share forgotten, retain NLL change, time)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before_path = out / "before.parquet"
    ids = [s.id for s in forget]
    before = None
    if before_path.exists():
        before = _read(before_path)
        if sorted(before.index) != sorted(ids):
            before = None
    if before is None:
        before = evaluate_outcomes(lm, forget)
        save_table(before, out / "before")
    rows, deltas = [], {}
    for name in methods:
        hp, train = get_preset(name, preset)
        train = replace(train, **(train_changes or {}))
        request = {"method": name, "preset": preset, "train": {k: v for k, v in
                                                               (train_changes or {}).items()},
                   "eval_every": eval_every, "threshold": threshold, "n_forget": len(forget),
                   "forget_ids_hash": hash_ids(ids), "model": lm.name}
        mdir = out / name
        settings_path = mdir / "settings.json"
        if settings_path.exists() and (mdir / "outcomes.parquet").exists():
            stored = json.loads(settings_path.read_text())
            if stored.get("request") == request:
                table = _read(mdir / "outcomes.parquet")
                after = _read(mdir / "after.parquet")
                deltas[name] = table["nll_delta"]
                rows.append(_summary(name, table, after, stored, threshold, reused=True))
                continue
        mdir.mkdir(exist_ok=True)
        traj = mdir / "trajectory.csv"
        traj.unlink(missing_ok=True)

        def sink(frame, path=traj):
            frame.to_csv(path, mode="a", header=not path.exists(), index=False)

        result = unlearn(lm, forget, retain, method=name, preset_name=preset,
                         hyperparameters=hp, train_config=train, eval_every=eval_every,
                         forget_threshold=threshold, before=before, evaluate_retain=bool(retain),
                         trajectory_sink=sink,
                         progress=(lambda s, t, row, n=name: progress(n, s, t, row))
                         if progress else None)
        table = result.per_sample()
        save_table(table, mdir / "outcomes")
        save_table(result.after, mdir / "after")
        settings = dict(result.settings, train_seconds=round(result.log.seconds, 2),
                        model=lm.name, request=request)
        if result.retain_after is not None:
            settings["retain_nll_delta_mean"] = float(
                (result.retain_after["nll"] - result.retain_before["nll"]).mean())
        if utility:
            sets = {"general": general_knowledge()}
            if retain:
                sets["retain"] = list(retain)
            settings["utility"] = model_utility(result.model, sets)
        settings_path.write_text(json.dumps(settings, indent=1, default=str) + "\n")
        deltas[name] = table["nll_delta"]
        rows.append(_summary(name, table, result.after, settings, threshold, reused=False))
        del result
    if len(deltas) > 1:
        pd.DataFrame(deltas).corr(method="spearman").to_csv(out / "agreement_nll_delta.csv")
    return pd.DataFrame(rows)


def _read(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path)
    return table.set_index("id") if "id" in table.columns else table


def hash_ids(ids: Sequence[str]) -> str:
    import hashlib
    return hashlib.sha256("\x1f".join(sorted(ids)).encode()).hexdigest()[:16]


def _summary(name, table, after, settings, threshold, reused) -> dict:
    s = spread(table["nll_delta"])
    return {"method": name, **{k: s[k] for k in ("min", "q1", "median", "q3", "max")},
            "forgotten": float((after["prob"] < threshold).mean()),
            "retain_nll_delta": settings.get("retain_nll_delta_mean"),
            "train_seconds": settings.get("train_seconds"), "reused": reused}
