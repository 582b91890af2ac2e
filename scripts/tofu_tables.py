"""Markdown tables of a validation folder (`cud validate --out`, a run's `validation/`, or
`results/tofu-forget10/`), as notes/tofu.md shows them: held-out rho of every metric against
every method (mean +- sd over pools, pooled interval), the paired tests against the best
baseline, the cross-method matrix beside the methods' own agreement, the variants chosen.

    python scripts/tofu_tables.py results/tofu-forget10 [--outcome nll_after]

Reads only the CSV tables; recomputes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ORDER = ["cud_paper", "cud_n75", "cud", "cud_weighted", "cud_n300", "cud_n3000", "cud_faithful", "cud_nodes",
         "cud_set_mean", "cud_set_knn", "selected", "predictor", "combined", "loss", "prob",
         "min_k_prob", "grad_norm", "exact_mem", "mrd", "answer_length", "question_type",
         "random"]


def _ordered(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in ORDER if n in names] + sorted(n for n in names if n not in ORDER)


def _cell(row: pd.Series) -> str:
    lo, hi = row.get("spearman_lo"), row.get("spearman_hi")
    text = f"{row['spearman']:+.2f} ± {row['spearman_sd']:.2f}"
    if pd.notna(lo) and pd.notna(hi):
        text += f" [{lo:+.2f}, {hi:+.2f}]"
    return text


def _markdown(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join([frame.index.name or ""] + cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row]) + " |")
    return "\n".join(lines)


def heldout(root: Path, outcome: str) -> str:
    h = pd.read_csv(root / "heldout.csv")
    h = h[h["outcome"] == outcome]
    methods = list(dict.fromkeys(h["method"]))
    table = pd.DataFrame(index=pd.Index(_ordered(h["metric"]), name="metric"), columns=methods)
    for _, row in h.iterrows():
        table.loc[row["metric"], row["method"]] = _cell(row)
    n = h.groupby("method")["n"].first().to_dict()
    table.columns = [f"{m} (n={n[m]})" for m in methods]
    return _markdown(table.fillna("–"))


def paired(root: Path, outcome: str) -> str:
    p = pd.read_csv(root / "paired.csv")
    p = p[p["outcome"] == outcome]
    rows = [{"method": r["method"], "ours": r["metric"], "versus": r["versus"],
             "difference": f"{r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]",
             "p": f"{r['p']:.2f}", "pools won": f"{round(r['pools_won'] * r['pools'])}"
                                               f" / {r['pools']}"}
            for _, r in p.iterrows()]
    return _markdown(pd.DataFrame(rows).set_index("method"))


def cross_method(root: Path, outcome: str) -> str:
    c = pd.read_csv(root / "cross_method.csv")
    c = c[c["outcome"] == outcome]
    cud = c.pivot_table(index="anchors_from", columns="method", values="spearman")
    parts = [("CUD held-out rho, anchors chosen on one method (rows) against each method "
              "(columns):"), "", _markdown(cud.round(2).rename_axis("anchors from"))]
    agreement = root / f"agreement_{outcome}.csv"
    if agreement.is_file():
        a = pd.read_csv(agreement, index_col=0).round(2).rename_axis("method")
        parts += ["", "The methods' own agreement (held-out Spearman of their outcomes):", "",
                  _markdown(a)]
    return "\n".join(parts)


def variants(root: Path) -> str:
    v = pd.read_csv(root / "variants.csv")
    chosen = v[v["selected"]].groupby("variant")["pool"].apply(
        lambda s: ", ".join(str(x) for x in sorted(s)))
    return _markdown(chosen.rename("pools").to_frame().rename_axis("variant chosen"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--outcome", default="nll_after")
    args = parser.parse_args(argv)
    if not (args.folder / "heldout.csv").is_file():
        print(f"{args.folder}: no heldout.csv (not a validation folder)", file=sys.stderr)
        return 2
    sections = [(f"Held-out rho ({args.outcome})", heldout(args.folder, args.outcome))]
    for title, name, make in (("Paired against the best baseline", "paired.csv", paired),
                              ("Across methods", "cross_method.csv", cross_method)):
        title = f"{title} ({args.outcome})"
        if (args.folder / name).is_file():
            sections.append((title, make(args.folder, args.outcome)))
    if (args.folder / "variants.csv").is_file():
        sections.append(("Variants chosen on the validation parts", variants(args.folder)))
    for title, body in sections:
        print(f"### {title}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
