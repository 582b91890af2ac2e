"""Markdown tables of a validation folder (`cud validate --out`, a run's `validation/`, or
`results/tofu-forget10/`), as notes/tofu.md shows them: held-out rho of every metric against
every method (mean +- sd over pools, pooled interval), the paired tests against the best
baseline, the cross-method matrix beside the methods' own agreement, the variants chosen.

    python scripts/tofu_tables.py results/tofu-forget10 [--outcome nll_after]
    python scripts/tofu_tables.py results/tofu-forget10/per-method/*   # one study per method

Several folders (single-method studies) are read as one: their held-out and paired rows side by
side, the variants each chose. Reads only the CSV tables; recomputes nothing.
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


def _cell(row: pd.Series, stat: str = "spearman") -> str:
    if stat != "spearman":  # Kendall tau, AUROC: mean over pools, its p or interval aside
        return f"{row[stat]:.2f}" if pd.notna(row[stat]) else "–"
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


def _read(roots: list[Path], name: str) -> pd.DataFrame:
    return pd.concat([pd.read_csv(r / name) for r in roots], ignore_index=True)


def heldout(roots: list[Path], outcome: str, stat: str = "spearman") -> str:
    h = _read(roots, "heldout.csv")
    h = h[h["outcome"] == outcome]
    methods = list(dict.fromkeys(h["method"]))
    table = pd.DataFrame(index=pd.Index(_ordered(h["metric"]), name="metric"), columns=methods)
    for _, row in h.iterrows():
        table.loc[row["metric"], row["method"]] = _cell(row, stat)
    n = h.groupby("method")["n"].first().to_dict()
    table.columns = [f"{m} (n={n[m]})" for m in methods]
    return _markdown(table.fillna("–"))


def paired(roots: list[Path], outcome: str) -> str:
    p = _read(roots, "paired.csv")
    p = p[p["outcome"] == outcome]
    rows = [{"method": r["method"], "ours": r["metric"], "versus": r["versus"],
             "difference": f"{r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]",
             "p": f"{r['p']:.2f}", "pools won": f"{round(r['pools_won'] * r['pools'])}"
                                               f" / {r['pools']}"}
            for _, r in p.iterrows()]
    return _markdown(pd.DataFrame(rows).set_index("method"))


def cross_method(roots: list[Path], outcome: str) -> str:
    root = roots[0]
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


def variants(roots: list[Path]) -> str:
    frames = []
    for root in roots:
        v = pd.read_csv(root / "variants.csv")
        chosen = v[v["selected"]].groupby("variant")["pool"].apply(
            lambda s: ", ".join(str(x) for x in sorted(s)))
        frame = chosen.rename("pools").to_frame().rename_axis("variant chosen")
        if len(roots) > 1:
            frame.insert(0, "study", root.name)
        frames.append(frame)
    return _markdown(pd.concat(frames))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="+")
    parser.add_argument("--outcome", default="nll_after")
    parser.add_argument("--stat", default="spearman", choices=["spearman", "kendall", "auroc"],
                        help="the held-out table's statistic (kendall, auroc: mean over pools)")
    args = parser.parse_args(argv)
    roots = args.folder
    for root in roots:
        if not (root / "heldout.csv").is_file():
            print(f"{root}: no heldout.csv (not a validation folder)", file=sys.stderr)
            return 2
    sections = [(f"Held-out {args.stat} ({args.outcome})",
                 heldout(roots, args.outcome, args.stat))]
    makers = [("Paired against the best baseline", "paired.csv", paired)]
    if len(roots) == 1:
        makers.append(("Across methods", "cross_method.csv", cross_method))
    for title, name, make in makers:
        title = f"{title} ({args.outcome})"
        if all((r / name).is_file() for r in roots):
            sections.append((title, make(roots, args.outcome)))
    if all((r / "variants.csv").is_file() for r in roots):
        sections.append(("Variants chosen on the validation parts", variants(roots)))
    for title, body in sections:
        print(f"### {title}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
