"""A committed study's scores against other methods' outcomes, without recomputing anything.

    python scripts/rescore.py UNLEARNING_FOLDER METHOD [METHOD ...] [--study results/tofu-forget10]

Every score of every anchor pool in the study's ``per_sample.parquet`` (anchors, held-out
samples and each metric's direction as that study chose them, e.g. on GradDiff's outcomes)
against each METHOD's ``<UNLEARNING_FOLDER>/<METHOD>/outcomes.parquet``, on the same held-out
samples: Spearman rho mean +- sd over pools with a pooled bootstrap interval (1000 resamples a
pool), the paired difference of CUD and of the selected variant against the loss baseline on
the same resamples, and the methods' own agreement over every sample. It asks whether a score
built on one method's anchors ranks another method's samples; the full study, with anchors
voted by every method, is `cud validate` / `cud run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from cud.difficulty.validation import bootstrap_draws, paired_difference, spearman_rows

METRICS = ["cud_paper", "cud", "selected", "cud_n3000", "cud_set_knn", "loss", "prob",
           "min_k_prob", "grad_norm", "answer_length"]
N_BOOT = 1000


def _indexed(table: pd.DataFrame) -> pd.DataFrame:
    return table.set_index("id") if "id" in table.columns else table


def rescore(study: Path, outcomes: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    per = pd.read_parquet(study / "per_sample.parquet")
    pools = pd.read_csv(study / "per_pool.csv")
    first = pools["method"].iloc[0]
    directions = pools[(pools["method"] == first) & (pools["outcome"] == "nll_after")] \
        .set_index(["pool", "metric"])["direction"]
    rows, paired = [], []
    for outcome in ("nll_after", "nll_delta"):
        for method, table in outcomes.items():
            rhos = {k: [] for k in METRICS}
            boots = {k: [] for k in METRICS}
            for pool, frame in per.groupby("pool"):
                held = frame[frame["role"] == "held-out"].set_index("id")
                ids = sorted(held.index)
                # the difficulty: high = hard to forget = a small NLL after / NLL increase
                y = -table[outcome].reindex(ids).to_numpy(float)
                draws = bootstrap_draws(len(ids), N_BOOT, 1000 * int(pool) + 7)
                for k in METRICS:
                    x = directions.get((pool, k), 1) * held[k].reindex(ids).to_numpy(float)
                    rhos[k].append(spearmanr(x, y).statistic)
                    boots[k].append(spearman_rows(x[draws], y[draws]))
            for k in METRICS:
                b = np.concatenate(boots[k])
                rows.append({"outcome": outcome, "method": method, "metric": k,
                             "spearman": np.mean(rhos[k]), "spearman_sd": np.std(rhos[k], ddof=1),
                             "spearman_lo": np.nanquantile(b, 0.025),
                             "spearman_hi": np.nanquantile(b, 0.975)})
            for k in ("cud", "selected"):
                test = paired_difference(np.concatenate(boots[k]),
                                         np.concatenate(boots["loss"]))
                paired.append({"outcome": outcome, "method": method, "metric": k,
                               "versus": "loss", **test})
    return pd.DataFrame(rows), pd.DataFrame(paired)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an unlearning folder (cud unlearn --out)")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--study", type=Path, default=Path("results/tofu-forget10"))
    parser.add_argument("--out", default=None, help="write the tables as CSV with this prefix")
    args = parser.parse_args()
    outcomes = {"graddiff": _indexed(pd.read_parquet(args.study / "outcomes_graddiff.parquet"))}
    for m in args.methods:
        outcomes[m] = _indexed(pd.read_parquet(args.folder / m / "outcomes.parquet"))
    held, paired = rescore(args.study, outcomes)
    if args.out:
        held.to_csv(f"{args.out}heldout.csv", index=False)
        paired.to_csv(f"{args.out}paired.csv", index=False)
    t = held[held["outcome"] == "nll_after"]
    cells = [f"{r.spearman:+.2f} ± {r.spearman_sd:.2f} [{r.spearman_lo:+.2f}, {r.spearman_hi:+.2f}]"
             for r in t.itertuples()]
    print(t.assign(cell=cells).pivot(index="metric", columns="method", values="cell")
          .reindex(METRICS)[list(outcomes)].to_string())
    print(paired[paired["outcome"] == "nll_after"].round(3).to_string(index=False))
    ids = sorted(outcomes["graddiff"].index)
    for outcome in ("nll_after", "nll_delta"):
        both = pd.DataFrame({m: t[outcome].reindex(ids) for m, t in outcomes.items()})
        print(f"{outcome}: the methods' own agreement (Spearman, all {len(ids)} samples)")
        print(both.corr("spearman").round(2).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
