"""Commands of the difficulty stage: `anchors`, `score` and `validate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cud.cli.app import app, console, fail
from cud.cli.common import load, progress_bar, samples_for
from cud.errors import CudError, DataError


def _id_list(spec: str) -> list[str]:
    """A file (one id per line, or a JSON list) or a comma-separated list of ids."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text()
        if path.suffix == ".json":
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"not JSON ({e.msg})", file=str(path), line=e.lineno) from None
            if not isinstance(values, list):
                raise DataError("expected a JSON list of sample ids", file=str(path))
            return [str(v) for v in values]
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [x.strip() for x in spec.split(",") if x.strip()]


def _csv_list(spec: str) -> list[str]:
    return [x.strip() for x in spec.split(",") if x.strip()]


def _int_list(spec: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv_list(spec))
    except ValueError:
        fail(f"{option} expects comma-separated whole numbers, got '{spec}'")


def _write(df, path: Path, index: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path.with_suffix(".parquet"), index=index)
    df.to_csv(path.with_suffix(".csv"), index=index)


def _selection(cs, n_edges: Optional[int]):
    from dataclasses import replace
    from cud.difficulty.anchors import selection_of
    sel = selection_of(cs.settings)
    if n_edges is not None:
        sel = replace(sel, selection="greedy" if sel.selection == "threshold" else sel.selection,
                      n_edges=n_edges)
    return sel


def _baselines_table(spec: str):
    import pandas as pd
    path = Path(spec)
    if path.is_dir():
        path = path / "baselines.parquet"
    if not path.is_file():
        raise DataError("no baselines table (run `cud baselines --out` first)", file=str(path))
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return table.set_index("id") if "id" in table.columns else table


def _fmt_ci(value, lo, hi) -> str:
    import math
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(lo, float) and math.isnan(lo):
        return f"{value:+.2f}"
    return f"{value:+.2f} [{lo:+.2f}, {hi:+.2f}]"


@app.command()
def anchors(
    circuits: str = typer.Option(..., help="Circuits folder of the forget set (`cud circuits`)."),
    outcomes: Optional[str] = typer.Option(None, help="`cud unlearn` output folder: anchors "
                                                      "from the methods' outcomes."),
    method: Optional[str] = typer.Option(None, help="Methods to vote (comma-separated) "
                                                    "(default: every method in --outcomes; "
                                                    "with --bilevel: graddiff)."),
    k: int = typer.Option(5, help="Anchors per method and side (top and bottom k)."),
    vote: str = typer.Option("majority", help="majority, any, all, or a number of methods."),
    outcome: str = typer.Option("nll_after", help="Outcome ranked: <metric>_after, "
                                                  "<metric>_delta or steps_to_forget."),
    pool: float = typer.Option(0.5, help="Share of the samples anchors are chosen from; the "
                                         "rest stays untouched for validation (1 = all)."),
    seed: int = typer.Option(0, help="Seed of the pool."),
    easy_ids: Optional[str] = typer.Option(None, help="Easy anchor ids: a file (one per line "
                                                      "or JSON list) or a comma list."),
    hard_ids: Optional[str] = typer.Option(None, help="Hard anchor ids (as --easy-ids)."),
    bilevel: bool = typer.Option(False, help="The bi-level selection (first-order) on --model."),
    model: Optional[str] = typer.Option(None, help="With --bilevel: the model before "
                                                   "unlearning."),
    data: str = typer.Option("builtin", help="With --bilevel: the QA data (forget + retain)."),
    forget_fraction: float = typer.Option(0.5, help="With --bilevel: as `cud unlearn`."),
    n_edges: Optional[int] = typer.Option(None, help="Anchor circuit size (default: the "
                                                     "circuits' own)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (with --bilevel)."),
    out: str = typer.Option("cud-anchors", help="Output folder."),
):
    """Choose easy and hard anchors and build their circuits (reusable by `cud score`)."""
    from rich.table import Table

    from cud.difficulty.anchors import anchor_circuits, anchors_from_ids, anchors_from_outcomes
    from cud.difficulty.groundtruth import read_outcomes
    from cud.runtime.store import load_circuits

    ways = sum([outcomes is not None, bool(easy_ids or hard_ids), bilevel])
    if ways != 1:
        fail("give exactly one of --outcomes, --easy-ids/--hard-ids or --bilevel")
    try:
        cs = load_circuits(circuits)
        if outcomes is not None:
            tables = read_outcomes(outcomes, _csv_list(method) if method else None)
            tables = {m: t.loc[[i for i in t.index if i in set(cs.ids)]]
                      for m, t in tables.items()}
            chosen = anchors_from_outcomes(tables, k, outcome=outcome,
                                           vote=int(vote) if vote.isdigit() else vote,
                                           pool_fraction=pool, seed=seed)
        elif bilevel:
            if not model:
                fail("--bilevel needs --model (the model before unlearning)")
            from cud.difficulty.bilevel import bilevel_anchors
            from cud.unlearning import split_forget_retain
            samples = samples_for(data, None, None)
            forget, retain = split_forget_retain(samples, forget_fraction, seed=seed)
            forget = [s for s in forget if s.id in set(cs.ids)]
            lm = load(model, device)
            with console.status("bi-level anchor selection (per-sample gradients)"):
                chosen = bilevel_anchors(lm, forget, k, retain=retain,
                                         method=(method or "graddiff"), pool_fraction=pool,
                                         seed=seed)
        else:
            if not (easy_ids and hard_ids):
                fail("give both --easy-ids and --hard-ids")
            chosen = anchors_from_ids(_id_list(easy_ids), _id_list(hard_ids), known=cs.ids)
        ac = anchor_circuits(chosen, cs.ids, cs.edge_scores, cs.graph, _selection(cs, n_edges),
                             circuit_settings=cs.settings)
        ac.save(out)
    except CudError as e:
        fail(str(e))
    table = Table(title=f"anchors {chosen.name}#{chosen.fingerprint} ({chosen.source})")
    table.add_column("side")
    table.add_column("samples", justify="right")
    table.add_column("circuit edges", justify="right")
    table.add_column("ids")
    for side, ids, circ in (("easy", chosen.easy, ac.easy_circuit),
                            ("hard", chosen.hard, ac.hard_circuit)):
        shown = ", ".join(ids[:6]) + (" …" if len(ids) > 6 else "")
        table.add_row(side, str(len(ids)), str(int(circ.sum())), shown)
    console.print(table)
    held = len(set(cs.ids) - set(chosen.excluded))
    console.print(f"{len(chosen.excluded)} samples informed the choice and are held back from "
                  f"validation; {held} of the circuits' samples are not")
    print(out)


@app.command()
def score(
    circuits: str = typer.Option(..., help="Circuits folder of the samples to score."),
    anchors: str = typer.Option(..., help="Anchors folder (`cud anchors --out`)."),
    distance: str = typer.Option("cosine", help="cosine, jaccard, hamming, or 'all'."),
    weighted: bool = typer.Option(False, help="Compare score-weighted circuits instead of "
                                              "binary ones."),
    n_edges: Optional[int] = typer.Option(None, help="Circuit size for both sides (default: "
                                                     "the anchors')."),
    out: str = typer.Option("cud-scores", help="Output folder."),
):
    """Score samples: CUD = d_E / (d_E + d_H), high = hard, no unlearning needed."""
    from dataclasses import replace

    import pandas as pd
    from rich.table import Table

    from cud.difficulty.anchors import check_compatible, load_anchors, selection_of
    from cud.difficulty.score import DISTANCES, score_samples
    from cud.runtime.store import load_circuits

    names = list(DISTANCES) if distance == "all" else _csv_list(distance)
    for name in names:
        if name not in DISTANCES:
            fail(f"unknown distance '{name}' (choose from {', '.join(DISTANCES)}, all)")
    try:
        ac = load_anchors(anchors)
        cs = load_circuits(circuits)
        check_compatible(ac, cs.graph, cs.settings)
        sel = ac.selection if n_edges is None else replace(ac.selection, n_edges=n_edges)
        own = cs.circuits if selection_of(cs.settings) == sel else None
        tables = [score_samples(cs.ids, cs.edge_scores, ac, distance_name=name,
                                weighted=weighted, circuits=own, selection=sel)
                  for name in names]
        result = pd.concat(tables, ignore_index=True)
        _write(result, Path(out) / "scores")
    except CudError as e:
        fail(str(e))
    summary = Table(title=f"CUD of {len(cs.ids)} samples (anchors "
                          f"{ac.anchors.name}#{ac.anchors.fingerprint}, {sel.n_edges} edges"
                          f"{', weighted' if weighted else ''})")
    for col in ("distance", "mean", "min", "median", "max", "hardest"):
        summary.add_column(col, justify="left" if col in ("distance", "hardest") else "right")
    for name, t in zip(names, tables):
        v = t["cud"]
        summary.add_row(name, f"{v.mean():.3f}", f"{v.min():.3f}", f"{v.median():.3f}",
                        f"{v.max():.3f}", str(t.loc[v.idxmax(), "id"]))
    console.print(summary)
    n_anchor = int((tables[0]["anchor_role"] != "").sum())
    if n_anchor:
        console.print(f"{n_anchor} of these samples are anchors themselves (column anchor_role)")
    print(out)


@app.command()
def validate(
    circuits: str = typer.Option(..., help="Circuits folder of the forget set."),
    outcomes: str = typer.Option(..., help="`cud unlearn` output folder (per-method outcomes)."),
    baselines: Optional[str] = typer.Option(None, help="`cud baselines` folder or table."),
    method: Optional[str] = typer.Option(None, help="Methods to judge against (comma list) "
                                                    "(default: all in --outcomes)."),
    anchors: Optional[str] = typer.Option(None, help="Main anchors folder (default: a vote of "
                                                     "the methods)."),
    k: int = typer.Option(5, help="Anchors per method and side."),
    vote: str = typer.Option("majority", help="majority, any, all, or a number."),
    anchor_outcome: str = typer.Option("nll_after", help="Outcome anchors are ranked by."),
    outcome: str = typer.Option("nll_after,nll_delta", help="Outcomes to judge against."),
    pool: float = typer.Option(0.5, help="Share of samples anchors come from (the rest is the "
                                         "held-out set; 1 = hold back only the anchors)."),
    seed: int = typer.Option(0, help="Seed of the pool, the bootstrap and the random ranking."),
    distance: str = typer.Option("cosine", help="Distance of the main CUD."),
    weighted: bool = typer.Option(False, help="Main CUD on score-weighted circuits."),
    sizes: str = typer.Option("50,75,100,200", help="Circuit sizes for the robustness table."),
    distances: str = typer.Option("cosine,jaccard,hamming", help="Distances for robustness."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples."),
    ci: float = typer.Option(0.95, help="Confidence level of the intervals."),
    predictor: bool = typer.Option(True, help="Also fit the circuit-feature predictor."),
    split_method: Optional[str] = typer.Option(None, help="Also run the easy/hard split "
                                                          "protocol with this method (needs "
                                                          "--model)."),
    model: Optional[str] = typer.Option(None, help="The model before unlearning (split "
                                                   "protocol)."),
    data: str = typer.Option("builtin", help="QA data of the unlearning run (split protocol: "
                                             "samples without outcomes are the retain set)."),
    preset: str = typer.Option("quick", help="Unlearning preset (split protocol)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (split protocol)."),
    out: str = typer.Option("cud-validation", help="Output folder."),
):
    """Judge CUD and every baseline on held-out samples; robustness; optional split protocol."""
    from rich.table import Table

    from cud.difficulty.anchors import load_anchors
    from cud.difficulty.groundtruth import read_outcomes
    from cud.difficulty.study import StudySettings, run_study
    from cud.difficulty.validation import mean_off_diagonal
    from cud.runtime.store import load_circuits

    out_dir = Path(out)
    if split_method and not model:
        fail("--split-method needs --model (the model before unlearning)")
    try:
        settings = StudySettings(
            k=k, vote=int(vote) if vote.isdigit() else vote, anchor_outcome=anchor_outcome,
            pool_fraction=pool, seed=seed, outcomes=tuple(_csv_list(outcome)), distance=distance,
            weighted=weighted, sizes=_int_list(sizes, "--sizes"),
            distances=tuple(_csv_list(distances)), n_boot=n_boot, ci=ci, predictor=predictor)
        cs = load_circuits(circuits)
        tables = read_outcomes(outcomes, _csv_list(method) if method else None)
        base = _baselines_table(baselines) if baselines else None
        main = None
        if anchors:
            from cud.difficulty.anchors import check_compatible
            ac = load_anchors(anchors)
            check_compatible(ac, cs.graph, cs.settings)
            main = ac.anchors
        with progress_bar() as bar:
            tasks = {}

            def progress(name, done, total):
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total, info="")
                bar.update(tasks[name], completed=done, total=total)

            study = run_study(cs.ids, cs.edge_scores, cs.graph, _selection(cs, None), tables,
                              baselines=base, anchors=main, circuits=cs.circuits,
                              settings=settings, circuit_settings=cs.settings,
                              progress=progress)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write(study.heldout, out_dir / "heldout")
        if not study.cross_method.empty:
            _write(study.cross_method, out_dir / "cross_method")
        _write(study.robustness, out_dir / "robustness")
        _write(study.metrics, out_dir / "metrics", index=True)
        for name, matrix in study.agreement.items():
            matrix.to_csv(out_dir / f"agreement_{name}.csv")
        (out_dir / "study.json").write_text(json.dumps({
            "settings": {k_: (list(v) if isinstance(v, tuple) else v)
                         for k_, v in settings.__dict__.items()},
            "anchors": {n: a.to_dict() for n, a in study.anchors.items()},
            "held_out": study.held_out, "excluded": study.excluded,
            "predictor": study.predictor}, indent=1, default=str) + "\n")
        split = None
        if split_method:
            split = _split_protocol(study, tables, split_method, model, data, preset, device,
                                    out_dir)
    except CudError as e:
        fail(str(e))

    first = settings.outcomes[0]
    h = study.heldout
    t = Table(title=f"held-out: Spearman ρ [{ci:.0%} CI] of each metric with each method's "
                    f"difficulty ({first}; n = {len(study.held_out)} held-out samples; "
                    f"sign = direction read from the anchors)")
    t.add_column("metric")
    methods = list(tables)
    for m in methods:
        t.add_column(m, justify="right")
    t.add_column("AUROC (mean over methods)", justify="right")
    for metric in h["metric"].unique():
        rows = h[(h["metric"] == metric) & (h["outcome"] == first)].set_index("method")
        sign = "+" if rows["direction"].iloc[0] > 0 else "−"
        t.add_row(f"{metric} ({sign})", *(_fmt_ci(rows.loc[m, "spearman"], rows.loc[m, "spearman_lo"],
                                                  rows.loc[m, "spearman_hi"]) for m in methods),
                  f"{rows['auroc'].mean():.2f}")
    console.print(t)
    if not study.cross_method.empty:
        cm = study.cross_method[study.cross_method["outcome"] == first]
        pivot = cm.pivot(index="anchors_from", columns="method", values="spearman")
        console.print(f"cross-method ({first}): Spearman ρ of CUD from the row method's anchors "
                      f"with the column method's difficulty")
        console.print(pivot.reindex(index=methods, columns=methods).round(2).to_string())
        agree = study.agreement[first]
        console.print(f"reference line, the methods' own agreement on the held-out samples "
                      f"(mean off-diagonal {mean_off_diagonal(agree):.2f}):")
        console.print(agree.round(2).to_string())
    r = study.robustness[study.robustness["outcome"] == first]
    piv = r.groupby(["n_edges", "distance", "weighted"]).agg(
        spearman=("spearman", "mean"), rho_vs_main=("rho_vs_main", "first")).reset_index()
    console.print(f"robustness ({first}; ρ averaged over methods; rho_vs_main = rank agreement "
                  f"with the main CUD):")
    console.print(piv.round(2).to_string(index=False))
    if split is not None:
        console.print(f"easy/hard split protocol ({split_method}):")
        console.print(split.summary.round(3).to_string(index=False))
        console.print(split.tests.round(4).to_string(index=False))
    print(out_dir)


def _split_protocol(study, tables, method, model, data, preset, device, out_dir):
    from cud.difficulty.split import easy_hard_protocol
    from cud.unlearning.general import general_knowledge

    samples = samples_for(data, None, None)
    with_outcome = {i for t in tables.values() for i in t.index}
    held = set(study.held_out)
    forget = [s for s in samples if s.id in held]
    retain = [s for s in samples if s.id not in with_outcome]
    if len(forget) < 2:
        raise DataError(f"only {len(forget)} held-out samples of --data have outcomes; is "
                        f"--data the data `cud unlearn` used?")
    lm = load(model, device)
    scores = study.metrics.loc[study.metrics["held_out"], "cud"]
    with progress_bar() as bar:
        task = bar.add_task("split protocol", total=None, info="")
        result = easy_hard_protocol(lm, forget, scores, retain=retain, general=general_knowledge(),
                                    method=method, preset_name=preset,
                                    progress=lambda half, s, t, row: bar.update(
                                        task, completed=s, total=t, info=half))
    _write(result.forget, out_dir / "split_forget", index=True)
    _write(result.summary, out_dir / "split_summary")
    _write(result.tests, out_dir / "split_tests")
    (out_dir / "split.json").write_text(json.dumps(result.settings, indent=1) + "\n")
    return result
