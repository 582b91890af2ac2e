"""Plain unlearning against the difficulty-aware strategies on TOFU forget10 (notes/act.md), from
`cud unlearn` folders of one model and forget set: one folder per (method, strategy, rate).

    python scripts/tofu_strategies.py RUN [RUN ...] --difficulty TABLE [--out FOLDER]

Each RUN is a `cud unlearn` folder (its manifest names the strategy and difficulty, each
``<method>/settings.json`` the rate). Every strategy run is paired with the plain run of the same
method at the same rate, sample by sample (:func:`cud.unlearning.compare.compare_strategy`:
share forgotten overall and in the predicted-hard quartile with Wilson intervals, retain NLL
rise, utility, McNemar's exact test on forgotten / not and Wilcoxon's on the NLL increase).
The predicted-hard quartile is the same for every strategy of a method: the quarter of the
forget set with the highest ``forecast_<method>`` of ``--difficulty`` (the best pre-unlearning
forecast), so the strategies are judged on one set of samples whatever difficulty they used.

``--out``: ``strategies.csv`` (the table), ``per_sample.csv`` (one row per run and sample:
forgotten or not, NLL before / after / rise) and ``tradeoff.png`` (retain NLL rise against
share forgotten, one line per strategy across rates, one panel per method).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from cud.unlearning.compare import compare_strategy
from cud.unlearning.folder import MANIFEST

THRESHOLD = 0.1


def describe(folder: Path) -> list[dict]:
    """One record per method run in a `cud unlearn` folder."""
    manifest = json.loads((folder / MANIFEST).read_text())
    strategy = manifest.get("strategy") or {}
    name = strategy.get("name", "plain")
    source = strategy.get("difficulty") or ""
    if ":" in source:
        source = source.rsplit(":", 1)[1]
    out = []
    for path in sorted(folder.glob("*/settings.json")):
        stored = json.loads(path.read_text())
        if "method" not in stored or not (path.parent / "after.parquet").exists():
            continue
        out.append({"folder": folder, "method": path.parent.name,
                    "strategy": name if not source else f"{name} ({source})",
                    "lr": float(stored.get("lr", stored["train"]["lr"])),
                    "threshold": float(stored.get("threshold", THRESHOLD))})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--difficulty", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    predicted = pd.read_csv(args.difficulty).set_index("id")
    predicted.index = predicted.index.astype(str)
    runs = [r for folder in args.runs for r in describe(folder)]
    plains = {(r["method"], r["lr"]): r for r in runs if r["strategy"] == "plain"}
    rows, samples = [], []
    for r in runs:
        forecast = predicted[f"forecast_{r['method']}"]
        plain = plains.get((r["method"], r["lr"]))
        if plain is None:
            print(f"{r['folder']}: no plain {r['method']} run at lr {r['lr']:g}; left out",
                  file=sys.stderr)
            continue
        table = compare_strategy(plain["folder"], r["folder"], [r["method"]], forecast,
                                 r["threshold"], r["strategy"])
        rows.append(table.assign(lr=r["lr"], folder=str(r["folder"])))
        out = pd.read_parquet(r["folder"] / r["method"] / "outcomes.parquet")
        out = out.set_index("id") if "id" in out.columns else out
        after = pd.read_parquet(r["folder"] / r["method"] / "after.parquet")
        after = after.set_index("id") if "id" in after.columns else after
        samples.append(pd.DataFrame({
            "method": r["method"], "strategy": r["strategy"], "lr": r["lr"],
            "forgotten": after["prob"] < r["threshold"], "nll_before": out["nll_before"],
            "nll_after": out["nll_after"], "nll_delta": out["nll_delta"],
            "predicted_hard": out.index.isin(
                forecast.index[forecast >= forecast.quantile(0.75)])}, index=out.index))
    table = pd.concat(rows, ignore_index=True)
    columns = ["method", "lr", "strategy", "n", "forgotten_strategy", "forgotten_strategy_lo",
               "forgotten_strategy_hi", "forgotten_hard_strategy", "forgotten_hard_strategy_lo",
               "forgotten_hard_strategy_hi", "retain_rise_strategy", "utility_strategy",
               "mcnemar_p", "mcnemar_p_hard", "wilcoxon_p_nll_delta"]
    table = table.sort_values(["method", "lr", "strategy"])
    print("| method | lr | strategy | forgotten [95 %] | predicted-hard quartile [95 %] | "
          "retain NLL rise | utility | p (McNemar) | p hard | p (Wilcoxon, NLL rise) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for _, t in table.iterrows():
        plain = t["strategy"] == "plain"
        p = "" if plain else f"{t['mcnemar_p']:.3g} | {t['mcnemar_p_hard']:.3g} | " \
                             f"{t['wilcoxon_p_nll_delta']:.3g}"
        print(f"| {t['method']} | {t['lr']:g} | {t['strategy']} | "
              f"{t['forgotten_strategy']:.1%} [{t['forgotten_strategy_lo']:.1%}, "
              f"{t['forgotten_strategy_hi']:.1%}] | {t['forgotten_hard_strategy']:.1%} "
              f"[{t['forgotten_hard_strategy_lo']:.1%}, {t['forgotten_hard_strategy_hi']:.1%}]"
              f" | {t['retain_rise_strategy']:+.3f} | "
              f"{t['utility_strategy'] if pd.notna(t['utility_strategy']) else float('nan'):.3f}"
              f" | {p if p else ' | | '} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table[columns + [c for c in table.columns if c not in columns]].to_csv(
            args.out / "strategies.csv", index=False)
        pd.concat(samples).rename_axis("id").reset_index().to_csv(
            args.out / "per_sample.csv", index=False)
        tradeoff(table, args.out / "tradeoff.png")
    return 0


def tradeoff(table: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = sorted(table["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        part = table[table["method"] == method]
        for strategy, rows in part.groupby("strategy"):
            rows = rows.sort_values("lr")
            ax.plot(rows["retain_rise_strategy"], rows["forgotten_strategy"], marker="o",
                    label=strategy)
            for _, r in rows.iterrows():
                ax.annotate(f"{r['lr']:g}", (r["retain_rise_strategy"],
                                             r["forgotten_strategy"]), fontsize=7)
        ax.set_title(method)
        ax.set_xlabel("retain NLL rise (nats)")
        ax.set_ylabel("share of the forget set forgotten")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
