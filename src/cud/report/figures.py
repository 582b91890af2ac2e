"""The report's figures, one function each, every one returning a matplotlib :class:`Figure`
(object-oriented API, no pyplot: nothing global, nothing shown).

Inputs are plain pandas / numpy objects indexed by sample id:
- ``cud``: Series of CUD scores (0 = at the easy anchor, 1 = at the hard anchor);
- ``anchors``: ``{"easy": [ids], "hard": [ids]}``;
- an outcome or difficulty: Series per method;
- circuits: (E,) or (N, E) arrays over a :class:`~cud.circuits.graph.Graph`'s edge index space.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.lines import Line2D

from cud.circuits.graph import Graph
from cud.circuits.structure import layer_pair_counts, node_membership

EASY, HARD, OTHER = "#2b8a3e", "#c92a2a", "#868e96"
#: reader kinds of an edge, and their colours in a circuit drawing
EDGE_KINDS = {"q": "#1c7ed6", "k": "#37b24d", "v": "#f08c00", "mlp": "#7048e8",
              "logits": "#495057"}


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _anchor_sets(anchors) -> tuple[set[str], set[str]]:
    if not anchors:
        return set(), set()
    return set(map(str, anchors.get("easy", []))), set(map(str, anchors.get("hard", [])))


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.4)):
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def cud_distribution(cud: pd.Series, anchors: Mapping[str, Sequence[str]] | None = None, *,
                     bins: int = 25) -> Figure:
    """Histogram of CUD over [0, 1], the anchors stacked in their own colours."""
    easy, hard = _anchor_sets(anchors)
    values = cud.dropna()
    ids = values.index.astype(str)
    parts = [(values[~ids.isin(easy | hard)].to_numpy(), OTHER, "samples"),
             (values[ids.isin(easy)].to_numpy(), EASY, "easy anchors"),
             (values[ids.isin(hard)].to_numpy(), HARD, "hard anchors")]
    parts = [p for p in parts if len(p[0])]
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.hist([p[0] for p in parts], bins=np.linspace(0, 1, bins + 1), stacked=True,
            color=[p[1] for p in parts], label=[f"{p[2]} ({len(p[0])})" for p in parts])
    ax.axvline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_xlabel("CUD (0 = like the easy anchors, 1 = like the hard anchors)")
    ax.set_ylabel("samples")
    ax.set_title(f"CUD of {len(values)} samples: median {values.median():.3f}, "
                 f"IQR {values.quantile(0.25):.3f}-{values.quantile(0.75):.3f}")
    ax.legend(frameon=False)
    return fig


def cud_vs_outcome(cud: pd.Series, outcomes: Mapping[str, pd.Series], *,
                   anchors: Mapping[str, Sequence[str]] | None = None,
                   excluded: Sequence[str] = (), titles: Mapping[str, str] | None = None,
                   ncols: int = 3) -> Figure:
    """One scatter per outcome (``{label: per-id values}``, e.g. ``"graddiff: nll_delta"``):
    CUD on x, the actual outcome on y. Evaluated samples are the held-out ones; the anchor
    pool's other samples (``excluded``: their outcomes were read to choose the anchors) are
    drawn hollow and the anchors in their colours. ``titles``: a second title line per panel
    (e.g. the study's held-out statistic)."""
    easy, hard = _anchor_sets(anchors)
    held = easy | hard | set(map(str, excluded))
    fig, axes = _grid(len(outcomes), ncols)
    for ax, (label, outcome) in zip(axes, outcomes.items()):
        outcome = outcome.copy()
        outcome.index = outcome.index.astype(str)
        frame = pd.DataFrame({"cud": cud.rename(index=str), "y": outcome}).dropna()
        ids = frame.index
        rest = frame[~ids.isin(held)]
        ax.scatter(rest["cud"], rest["y"], s=12, color=OTHER, alpha=0.8,
                   label="evaluated (held out)")
        skipped = frame[ids.isin(held - easy - hard)]
        if len(skipped):
            ax.scatter(skipped["cud"], skipped["y"], s=10, facecolors="none",
                       edgecolors=OTHER, alpha=0.6, label="anchor pool (not evaluated)")
        for group, colour, name in ((easy, EASY, "easy anchors"), (hard, HARD, "hard anchors")):
            part = frame[ids.isin(group)]
            if len(part):
                ax.scatter(part["cud"], part["y"], s=22, color=colour, marker="D", label=name)
        extra = (titles or {}).get(label, f"{len(rest)} evaluated samples")
        ax.set_title(f"{label}\n{extra}", fontsize=10)
        ax.set_xlabel("CUD")
        ax.set_ylabel(label.split(":")[-1].strip())
        ax.set_xlim(-0.02, 1.02)
    if len(axes):
        axes[0].legend(frameon=False, fontsize=8)
    return fig


def roc_table(scores: pd.DataFrame, hard: Mapping[str, pd.Series], *,
              directions: Mapping[str, int] | None = None) -> pd.DataFrame:
    """AUROC of every score (column of ``scores``, index id) at telling the hard samples of each
    method (``{method: bool Series}``, True = hard) from the rest, on the ids both have.

    Each score is read in its ``directions`` (+1: higher = harder; -1: negated, ``negated``),
    the directions the study read from the anchors; a score without one keeps its sign.
    Long table: method, score, n, auc, negated."""
    from sklearn.metrics import roc_auc_score
    rows = []
    for method, labels in hard.items():
        labels = labels.copy()
        labels.index = labels.index.astype(str)
        for name in scores.columns:
            s = scores[name].rename(index=str)
            frame = pd.DataFrame({"s": s, "y": labels}).dropna()
            frame = frame[np.isfinite(frame["s"].astype(float))]
            y = frame["y"].astype(bool).to_numpy()
            negated = int((directions or {}).get(name, 1)) < 0
            auc = float("nan")
            if 0 < y.sum() < len(y):
                auc = float(roc_auc_score(y, (-1 if negated else 1)
                                          * frame["s"].to_numpy(float)))
            rows.append({"method": method, "score": name, "n": len(frame), "auc": auc,
                         "negated": negated})
    return pd.DataFrame(rows, columns=["method", "score", "n", "auc", "negated"])


def roc_curves(scores: pd.DataFrame, hard: Mapping[str, pd.Series], *,
               directions: Mapping[str, int] | None = None, ncols: int = 3) -> Figure:
    """One panel per method: ROC curves of every score at finding that method's hard samples
    (directions as in :func:`roc_table`; a negated score is labelled ``-name``; CUD in black)."""
    from sklearn.metrics import roc_curve
    table = roc_table(scores, hard, directions=directions)
    fig, axes = _grid(len(hard), ncols, size=(4.2, 4.0))
    for ax, (method, labels) in zip(axes, hard.items()):
        labels = labels.copy()
        labels.index = labels.index.astype(str)
        for k, name in enumerate(scores.columns):
            row = table[(table["method"] == method) & (table["score"] == name)].iloc[0]
            if not np.isfinite(row["auc"]):
                continue
            frame = pd.DataFrame({"s": scores[name].rename(index=str), "y": labels}).dropna()
            frame = frame[np.isfinite(frame["s"].astype(float))]
            s = frame["s"].to_numpy(float) * (-1 if row["negated"] else 1)
            fpr, tpr, _ = roc_curve(frame["y"].astype(bool).to_numpy(), s)
            is_cud = name == "cud"
            ax.plot(fpr, tpr, lw=2.4 if is_cud else 1.2, color="black" if is_cud else None,
                    zorder=3 if is_cud else 2,
                    label=f"{'-' if row['negated'] else ''}{name} ({row['auc']:.2f})")
        ax.plot([0, 1], [0, 1], color=OTHER, ls=":", lw=0.8)
        n = int(table.loc[table["method"] == method, "n"].max()) if len(table) else 0
        ax.set_title(f"hard under {method} (n = {n})", fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        ax.legend(frameon=False, fontsize=7, loc="lower right", title="AUROC",
                  title_fontsize=7)
    return fig


#: colour of each kind of estimate on the ladder
LADDER_KINDS = {"baseline": "#495057", "cud": "#1c7ed6", "pilot": "#f08c00",
                "forecaster": "#2b8a3e"}


def forecast_ladder(ladder: pd.DataFrame, *, outcome: str, ncols: int = 3) -> Figure:
    """The forecast ladder: one panel per method, one point per estimate at x = its seconds per
    sample (log scale; free estimates at the left edge, unknown prices left out) and y = its
    held-out ρ (mean over pools) with the pooled interval; colours by kind (baseline, CUD,
    pilot, learned forecaster); the best single baseline's ρ as a dotted line."""
    rows = ladder[ladder["outcome"] == outcome]
    methods = list(dict.fromkeys(rows["method"]))
    fig, axes = _grid(max(1, len(methods)), ncols, size=(5.0, 4.0))
    for ax, method in zip(axes, methods):
        r = rows[(rows["method"] == method) & np.isfinite(rows["seconds_per_sample"])
                 & np.isfinite(rows["spearman"])].copy()
        positive = r.loc[r["seconds_per_sample"] > 0, "seconds_per_sample"]
        floor = float(positive.min()) / 10 if len(positive) else 1e-3
        r["x"] = r["seconds_per_sample"].where(r["seconds_per_sample"] > 0, floor)
        for kind, colour in LADDER_KINDS.items():
            part = r[r["kind"] == kind]
            if part.empty:
                continue
            lo = (part["spearman"] - part["spearman_lo"]).clip(lower=0).fillna(0)
            hi = (part["spearman_hi"] - part["spearman"]).clip(lower=0).fillna(0)
            ax.errorbar(part["x"], part["spearman"], yerr=[lo, hi], fmt="o", ms=4,
                        color=colour, ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.85,
                        label=kind)
        shown = r.sort_values("spearman", ascending=False)
        shown = shown[~shown["estimate"].str.match(r"cud_(n\d+|weighted|nodes|paper|faithful)")]
        placed = set()
        for _, row in shown.head(8).iterrows():   # label the best few, not every variant
            where = (round(float(row["x"]), 12), round(float(row["spearman"]), 3))
            if where in placed:   # the same point (e.g. pilots on one step): one label
                continue
            placed.add(where)
            ax.annotate(row["estimate"].replace("forecast_", "F:"), (row["x"], row["spearman"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        versus = r["versus"].dropna()
        if len(versus) and versus.iloc[0] in set(r["estimate"]):
            base = r.loc[r["estimate"] == versus.iloc[0], "spearman"].iloc[0]
            ax.axhline(base, color=OTHER, ls=":", lw=0.8)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xscale("log")
        flag = " (COLLAPSED)" if bool(r["collapsed"].any()) else ""
        ax.set_title(f"{method}{flag}: {outcome}", fontsize=10,
                     color=HARD if flag else "black")
        ax.set_xlabel(f"seconds per sample (log; free at {floor:.2g})")
        ax.set_ylabel("held-out Spearman ρ")
        if r.empty:
            ax.text(0.5, 0.5, "no prices recorded", transform=ax.transAxes, ha="center",
                    color=OTHER)
    handles, labels = axes[0].get_legend_handles_labels() if len(methods) else ([], [])
    if handles:
        axes[0].legend(handles, labels, frameon=False, fontsize=7, loc="lower right")
    return fig


def strategy_tradeoff(table: pd.DataFrame, *, ncols: int = 3) -> Figure:
    """Plain against a strategy, one panel per method: x = mean retain NLL rise (the damage),
    y = share of the forget set forgotten (circles) and of its predicted-hard quartile
    (triangles), each with its Wilson interval; an arrow from plain to the strategy. Up and to
    the left is better."""
    methods = list(dict.fromkeys(table["method"]))
    fig, axes = _grid(max(1, len(methods)), ncols, size=(4.4, 3.6))
    name = str(table["strategy"].iloc[0]) if "strategy" in table.columns and len(table) else ""
    for ax, method in zip(axes, methods):
        row = table[table["method"] == method].iloc[0]
        for part, marker in (("", "o"), ("hard_", "^")):
            for side, colour in (("plain", OTHER), ("strategy", EASY)):
                y = float(row[f"forgotten_{part}{side}"])
                lo = pd.to_numeric(row.get(f"forgotten_{part}{side}_lo"), errors="coerce")
                hi = pd.to_numeric(row.get(f"forgotten_{part}{side}_hi"), errors="coerce")
                yerr = None if pd.isna(lo) or pd.isna(hi) else [[max(y - lo, 0)],
                                                               [max(hi - y, 0)]]
                ax.errorbar([row[f"retain_rise_{side}"]], [y], yerr=yerr, fmt=marker,
                            color=colour, ecolor=colour, elinewidth=0.8, capsize=2, ms=6,
                            label=f"{'hard quartile' if part else 'all'}, "
                                  f"{'plain' if side == 'plain' else name}")
            ax.annotate("", xy=(row["retain_rise_strategy"], row[f"forgotten_{part}strategy"]),
                        xytext=(row["retain_rise_plain"], row[f"forgotten_{part}plain"]),
                        arrowprops={"arrowstyle": "->", "color": EASY, "lw": 0.8})
        ax.set_ylim(-0.03, 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("retain NLL rise (nats)")
        ax.set_ylabel("share forgotten")
    if len(methods):
        axes[0].legend(frameon=False, fontsize=6, loc="upper left")
    return fig


def _layer_ticks(n: int, first: str, last: str | None = None) -> tuple[list[int], list[str]]:
    """Tick positions and labels for n layer bins (first bin ``first``; last bin ``last``)."""
    step = max(1, int(np.ceil(n / 12)))
    pos = list(range(0, n, step))
    if n - 1 not in pos:
        pos.append(n - 1)
    labels = []
    for p in pos:
        if first == "input":
            labels.append("input" if p == 0 else str(p - 1))
        else:
            labels.append(last if (last and p == n - 1) else str(p))
    return pos, labels


def layer_heatmaps(graph: Graph, circuits: Mapping[str, np.ndarray]) -> Figure:
    """Layer-by-layer heat maps: for each named circuit (an (E,) vector, or (N, E) averaged over
    its rows), the number of edges from each writer layer (x; ``input`` first) into each reader
    layer (y; ``logits`` on top). With exactly two circuits a third panel shows second - first.
    Distance below the diagonal is an edge's span."""
    weights = {}
    for name, c in circuits.items():
        c = np.asarray(c.detach().cpu().numpy() if hasattr(c, "detach") else c, dtype=float)
        weights[name] = layer_pair_counts(graph, c).mean(0)
    panels = list(weights.items())
    if len(panels) == 2:
        (a, wa), (b, wb) = panels
        panels.append((f"{b} - {a}", wb - wa))
    n = graph.n_layers + 1
    side = min(5.0, 2.2 + 0.12 * n)
    fig = Figure(figsize=((side + 1.2) * len(panels), side + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    xpos, xlab = _layer_ticks(n, "input")
    ypos, ylab = _layer_ticks(n, "layer", "logits")
    for k, (ax, (name, matrix)) in enumerate(zip(axes, panels)):
        diverging = len(panels) == 3 and k == 2
        if diverging:
            bound = max(float(np.abs(matrix).max()), 1e-9)
            image = ax.imshow(matrix, origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound)
        else:
            image = ax.imshow(np.ma.masked_equal(matrix, 0), origin="lower", cmap="viridis")
        fig.colorbar(image, ax=ax, shrink=0.8, label="edges")
        ax.set_xticks(xpos, xlab, fontsize=7, rotation=90)
        ax.set_yticks(ypos, ylab, fontsize=7)
        ax.set_xlabel("writer layer")
        ax.set_ylabel("reader layer")
        ax.set_title(f"{name}\n({matrix.sum():.0f} edges)" if not diverging else
                     f"{name}\n(red: more in the second)", fontsize=9)
        ax.set_facecolor("#f8f9fa")
    return fig


#: how far above its layer's heads an MLP is drawn, so head -> MLP edges of one layer show
MLP_RISE = 0.4


def _node_xy(graph: Graph) -> np.ndarray:
    """(F + 1, 2) drawing positions of the forward nodes and, last, ``logits``: x = head index
    (MLP after the heads), y = layer (MLPs a little higher; input at -1, logits at L); input and
    logits sit between two head columns so their edges do not run through a head."""
    h = graph.n_heads
    middle = h // 2 - 0.5 if h > 1 else 0.5
    xy = np.zeros((graph.n_forward + 1, 2))
    xy[0] = (middle, -1)
    for layer in range(graph.n_layers):
        for head in range(h):
            xy[graph.head_forward(layer, head)] = (head, layer)
        xy[graph.mlp_forward(layer)] = (h + 0.6, layer + MLP_RISE)
    xy[-1] = (middle, graph.n_layers)
    return xy


def _edge_kind(graph: Graph) -> np.ndarray:
    """(E,) reader kind of every edge: q, k, v, mlp or logits."""
    cache = graph._cache
    if "report_edge_kind" not in cache:
        kinds = np.empty(graph.n_backward, dtype=object)
        for b, name in enumerate(graph.backward_names):
            kinds[b] = name[-2] if name.endswith(">") else ("logits" if name == "logits"
                                                           else "mlp")
        cache["report_edge_kind"] = kinds[graph.edge_child]
    return cache["report_edge_kind"]


def circuit_drawing(graph: Graph, circuit, edge_scores=None, *, title: str = "") -> Figure:
    """A circuit drawn with layers as rows: heads then the MLP of each layer along a row, input
    below, logits on top. Every edge of the circuit is a line from its writer to the node it is
    read by, coloured by the reader (q, k, v, MLP, logits), its width growing with |score| when
    ``edge_scores`` (E,) are given."""
    member = np.asarray(circuit.detach().cpu().numpy() if hasattr(circuit, "detach")
                        else circuit).ravel() != 0
    if member.shape != (graph.n_edges,):
        raise ValueError(f"a circuit of this graph has {graph.n_edges} edges, got "
                         f"{member.shape[0]}")
    xy = _node_xy(graph)
    edges = np.nonzero(member)[0]
    owner = graph.backward_owner[graph.edge_child[edges]]
    owner = np.where(owner < 0, graph.n_forward, owner)
    segments = np.stack([xy[graph.edge_parent[edges]], xy[owner]], axis=1)
    width = np.full(len(edges), 1.0)
    if edge_scores is not None and len(edges):
        s = np.abs(np.asarray(edge_scores.detach().cpu().numpy() if hasattr(edge_scores, "detach")
                              else edge_scores, dtype=float).ravel()[edges])
        width = 0.5 + 3.0 * s / s.max() if s.max() > 0 else width
    kinds = _edge_kind(graph)[edges]
    height = min(14.0, 2.0 + 0.32 * (graph.n_layers + 2))
    fig = Figure(figsize=(max(5.0, 1.2 + 0.55 * (graph.n_heads + 2)), height),
                 layout="constrained")
    ax = fig.subplots()
    for kind, colour in EDGE_KINDS.items():
        pick = kinds == kind
        if pick.any():
            ax.add_collection(LineCollection(segments[pick], colors=colour, linewidths=width[pick],
                                             alpha=0.65, zorder=1))
    used = node_membership(graph, member)[0]
    ax.scatter(xy[:-1][~used, 0], xy[:-1][~used, 1], s=10, color="#dee2e6", zorder=2)
    ax.scatter(xy[:-1][used, 0], xy[:-1][used, 1], s=36, color="black", zorder=3)
    ax.scatter([xy[-1, 0]], [xy[-1, 1]], s=60, color="black", marker="s", zorder=3)
    ax.scatter([xy[0, 0]], [xy[0, 1]], s=60, color="black", marker="s", zorder=3)
    ax.annotate("logits", xy[-1], xytext=(8, 0), textcoords="offset points", va="center")
    ax.annotate("input", xy[0], xytext=(8, 0), textcoords="offset points", va="center")
    ypos, ylab = _layer_ticks(graph.n_layers + 2, "input")
    ax.set_yticks([p - 1 for p in ypos],
                  ["logits" if p == graph.n_layers + 1 else lab for p, lab in zip(ypos, ylab)],
                  fontsize=8)
    ax.set_xticks(list(range(graph.n_heads)) + [graph.n_heads + 0.6],
                  [f"h{h}" for h in range(graph.n_heads)] + ["MLP"], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_xlim(-0.8, graph.n_heads + 1.6)
    ax.set_ylim(-1.7, graph.n_layers + 0.7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles = [Line2D([], [], color=c, lw=2, label=k) for k, c in EDGE_KINDS.items()
               if (kinds == k).any()]
    ax.legend(handles=handles, title="read as", frameon=False, fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{title} ({len(edges)} edges, {int(used[1:].sum())} heads/MLPs)".strip(),
                 fontsize=10)
    return fig


def structure_boxplots(statistics: pd.DataFrame, groups: Mapping[str, Sequence[str]], *,
                       columns: Sequence[str] | None = None,
                       effects: Mapping[str, float] | None = None, ncols: int = 4) -> Figure:
    """Box plots of each statistic per group (e.g. easy and hard anchors), with the individual
    samples; ``effects`` (statistic -> Cliff's delta) goes in the panel titles."""
    columns = list(columns or [c for c in statistics.columns
                               if pd.api.types.is_numeric_dtype(statistics[c])])
    names = list(groups)
    colours = [EASY if "easy" in n else HARD if "hard" in n else OTHER for n in names]
    fig, axes = _grid(len(columns), ncols, size=(3.0, 2.6))
    rng = np.random.default_rng(0)
    for ax, col in zip(axes, columns):
        data = [statistics.loc[[i for i in groups[n] if i in statistics.index], col]
                .to_numpy(float) for n in names]
        data = [d[np.isfinite(d)] for d in data]
        ax.boxplot(data, showfliers=False, widths=0.5)
        ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
        for k, (d, colour) in enumerate(zip(data, colours)):
            ax.scatter(k + 1 + rng.uniform(-0.15, 0.15, len(d)), d, s=8, color=colour, alpha=0.7)
        delta = (effects or {}).get(col)
        ax.set_title(col + (f"\nδ = {delta:+.2f}" if delta is not None and np.isfinite(delta)
                            else ""), fontsize=9)
        ax.tick_params(labelsize=7)
    return fig
