"""The forecast ladder of the committed TOFU study (`results/tofu-forget10`), recomputed from
its tables alone (pandas and scikit-learn; no model is loaded): for each method's own study
(`per-method/<method>/`: every pool's anchors and held-out ids in `study.json`, every sample's
scores in each pool in `per_sample.parquet`), the learned forecasters of
:mod:`cud.difficulty.forecast` fitted on each pool's samples and judged on its held-out ones,
beside every single estimate, with the study's intervals and paired test against the best single
baseline (:func:`cud.difficulty.ladder.ladder_table`).

    python scripts/tofu_ladder.py results/tofu-forget10 [--outcome nll_after] [--model boosting]
        [--pilots PILOTS] [--unlearning FOLDER ...] [--replace METHOD ...] [--out ladder.csv]

``--pilots``: a `cud pilot` folder of the same fine-tuned model and forget set; each method's
pilot scores join its single estimates (and the pilot forecaster), with their measured prices.
``--unlearning``: `cud unlearn` folders of the same model and forget set; they give each of
their methods' measured cost (seconds per sample of training and evaluation: the pilots'
``share_of_method``) and flags (calibrated, collapsed). ``--replace M``: judge method M against
the outcomes of its run in those folders instead of the committed ones (a calibrated re-run);
its anchors are then chosen again, in each committed pool, from the new outcomes (the study's
rule: the k most and least forgotten of the pool), and CUD and its variants, which need the
circuits of the new anchors (the run's circuits folder was not kept), are left out for it.

Circuit-structure statistics come from `structure.parquet`, the question type and length from
`circuits_samples.parquet`. These runs were made before prices were kept, so the ladder's
seconds per sample are unknown here (NaN) except the free estimates'; notes/tofu.md has the
stages' times. The single estimates' statistics must equal the committed `heldout.csv`
(same pools, same bootstrap seeds): the script checks it and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cud.difficulty.anchors import anchors_from_outcomes
from cud.difficulty.forecast import is_cud, one_hot_types
from cud.difficulty.groundtruth import difficulty
from cud.difficulty.ladder import ForecastInputs, PoolView, Prices, ladder_table
from cud.difficulty.stage import forecast_inputs

OUTCOMES = ("nll_after", "nll_delta")
#: what a per-sample table holds that is not an estimate (or is learned from the outcomes)
NOT_SCORES = ("id", "pool", "role", "predictor", "combined")


def views_of(root: Path, method: str, info: pd.DataFrame, features: pd.DataFrame,
             pilot: pd.DataFrame | None = None, outcomes: pd.DataFrame | None = None
             ) -> list[PoolView]:
    """Each committed pool of ``method``'s study, seen as the ladder sees it. ``pilot``: that
    method's pilot scores, added to every pool. ``outcomes``: new outcomes of the method (a
    re-run): its anchors are chosen again in each pool from them, the question type's pool
    mean is taken of their difficulty, and the CUD columns (scored with the old anchors) are
    dropped."""
    folder = root / "per-method" / method
    study = json.loads((folder / "study.json").read_text())
    per_sample = pd.read_parquet(folder / "per_sample.parquet")
    settings = study["settings"]
    views = []
    for pool in study["pools"]:
        rows = per_sample[per_sample["pool"] == pool["seed"]].set_index("id")
        rows.index = rows.index.astype(str)
        scores = rows.drop(columns=[c for c in NOT_SCORES if c in rows.columns])
        scores["question_length"] = info["question_length"].reindex(scores.index)
        ids = [str(i) for i in pool["pool"]]
        main = pool["anchors"].get(method, pool["anchors"]["main"])
        easy, hard = [str(i) for i in main["easy"]], [str(i) for i in main["hard"]]
        if outcomes is not None:
            chosen = anchors_from_outcomes({method: outcomes}, int(settings["k"]),
                                           outcome=settings["anchor_outcome"], pool=ids)
            easy, hard = list(chosen.easy), list(chosen.hard)
            scores = scores.drop(columns=[c for c in scores.columns
                                          if is_cud(c) or c == "selected"])
            target = difficulty(outcomes, settings["anchor_outcome"])
            types = info["question_type"]
            means = target.reindex(ids).groupby(types.reindex(ids)).mean()
            scores["question_type"] = types.reindex(scores.index).map(means)
        if pilot is not None:
            for c in pilot.columns:
                scores[c] = pilot[c].reindex(scores.index).astype(float)
        views.append(PoolView(int(pool["seed"]), ids, easy, hard,
                              [str(i) for i in pool["held_out"]], scores, features))
    return views


def measured(pilots: Path | None, unlearning: list[Path]) -> ForecastInputs:
    """The pilots' scores and prices, and each method's cost and flags, from the folders."""
    found = forecast_inputs(pilots=pilots) if pilots else ForecastInputs()
    for folder in unlearning:
        more = forecast_inputs(unlearning=folder)
        found.prices.methods.update(more.prices.methods)
        found.flags.update(more.flags)
    return found


def replaced_outcomes(unlearning: list[Path], method: str) -> pd.DataFrame:
    for folder in unlearning:
        path = folder / method / "outcomes.parquet"
        if path.exists():
            table = pd.read_parquet(path)
            table.index = table.index.astype(str)
            return table
    raise SystemExit(f"error: --replace {method}: no {method}/outcomes.parquet in the "
                     f"--unlearning folders")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--outcome", default="nll_after", choices=OUTCOMES)
    parser.add_argument("--model", default="ridge", choices=("ridge", "boosting"))
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write the whole ladder (CSV)")
    parser.add_argument("--pilots", type=Path, default=None, help="a cud pilot folder")
    parser.add_argument("--unlearning", type=Path, action="append", default=[],
                        help="a cud unlearn folder: methods' costs and flags (repeatable)")
    parser.add_argument("--replace", action="append", default=[],
                        help="judge this method against its outcomes in --unlearning")
    args = parser.parse_args(argv)
    root = args.root
    circuits = pd.read_parquet(root / "circuits_samples.parquet").set_index("id")
    circuits.index = circuits.index.astype(str)
    info = pd.DataFrame({"question_length": (circuits["n_tokens"]
                                             - circuits["n_answer_tokens"]).astype(float),
                         "question_type": circuits["question_type"]})
    structure = pd.read_parquet(root / "structure.parquet")
    structure.index = structure.index.astype(str)
    features = structure.add_prefix("s_").join(one_hot_types(circuits["question_type"]))
    methods = sorted(p.name for p in (root / "per-method").iterdir() if p.is_dir())
    found = measured(args.pilots, args.unlearning)
    tables = []
    for m in methods:
        new = replaced_outcomes(args.unlearning, m) if m in args.replace else None
        outcomes = pd.read_parquet(root / f"outcomes_{m}.parquet") if new is None else new
        truths = {(m, o): difficulty(outcomes, o) for o in OUTCOMES}
        views = views_of(root, m, info, features, found.pilots.get(m), new)
        table, _ = ladder_table({m: views}, truths, prices=found.prices,
                                collapsed=found.collapsed(), n_boot=args.n_boot,
                                kind=args.model)
        if new is not None:
            print(f"{m}: judged against the re-run's outcomes (anchors chosen again; no CUD)",
                  file=sys.stderr)
            tables.append(table)
            continue
        check = pd.read_csv(root / "per-method" / m / "heldout.csv").set_index(
            ["metric", "outcome"])
        singles = table[table["kind"].isin(["baseline", "cud"])
                        & table["estimate"].isin(check.index.get_level_values(0))]
        worst = max(abs(r["spearman"] - check.loc[(r["estimate"], r["outcome"]), "spearman"])
                    for _, r in singles.iterrows()
                    if np.isfinite(r["spearman"]))
        print(f"{m}: {len(singles)} single estimates recomputed, largest difference from the "
              f"committed heldout.csv {worst:.2g}", file=sys.stderr)
        tables.append(table)
    ladder = pd.concat(tables, ignore_index=True)
    if args.out:
        ladder.to_csv(args.out, index=False)
    rows = ladder[ladder["outcome"] == args.outcome]
    print(f"## Forecasters ({args.model}) against the best single baseline, {args.outcome}\n")
    print("| method | estimate | held-out ρ ± sd [pooled 95 %] | best single baseline | "
          "difference [95 %] | p | pools won |")
    print("|---|---|---|---|---|---|---|")
    for _, r in rows.iterrows():
        if r["kind"] != "forecaster" and r["estimate"] != r["versus"] and \
                r["estimate"] not in ("cud", "cud_set_knn", "selected"):
            continue
        base = rows[(rows["method"] == r["method"]) & (rows["estimate"] == r["versus"])].iloc[0]
        diff = "" if r["estimate"] == r["versus"] else \
            f"{r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]"
        p = "" if r["estimate"] == r["versus"] else f"{r['p']:.3g}"
        won = "" if r["estimate"] == r["versus"] else f"{r['pools_won'] * r['pools']:.0f} / " \
                                                      f"{r['pools']}"
        print(f"| {r['method']} | {r['estimate']} | {r['spearman']:+.3f} ± "
              f"{r['spearman_sd']:.3f} [{r['spearman_lo']:+.3f}, {r['spearman_hi']:+.3f}] | "
              f"{r['versus']} {base['spearman']:+.3f} | {diff} | {p} | {won} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
