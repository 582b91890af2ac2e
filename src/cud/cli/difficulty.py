"""Commands of the difficulty stage: `anchors`, `score` and `validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cud.cli.app import command, console
from cud.cli.common import load, say_text_cuts
from cud.cli.options import (csv_list, default, id_list, int_list, out_folder, settings_from)
from cud.cli.render import fmt_ci, progress_bars
from cud.difficulty.study import StudySettings
from cud.errors import ConfigError

D = StudySettings


def _selection(cs, n_edges: Optional[int]):
    from dataclasses import replace
    from cud.difficulty.anchors import selection_of
    sel = selection_of(cs.settings)
    if n_edges is not None:
        sel = replace(sel, selection="greedy" if sel.selection == "threshold" else sel.selection,
                      n_edges=n_edges)
    return sel


def _outcomes_of(folder: str, method: Optional[str], ids):
    from cud.difficulty.groundtruth import read_outcomes
    tables = read_outcomes(folder, csv_list(method))
    keep = set(ids)
    return {m: t.loc[[i for i in t.index if i in keep]] for m, t in tables.items()}


@command
def anchors(
    circuits: str = typer.Option("cud-out/circuits", help="Circuits folder of the forget set "
                                                          "(`cud circuits`)."),
    outcomes: Optional[str] = typer.Option(None, help="`cud unlearn` output folder: anchors "
                                                      "from the methods' outcomes."),
    method: Optional[str] = typer.Option(None, help="Methods to vote (comma-separated) "
                                                    "(default: every method in --outcomes; "
                                                    "with --bilevel: graddiff)."),
    k: Optional[int] = typer.Option(None, help=f"Anchors per method and side {default(D, 'k')}."),
    vote: Optional[str] = typer.Option(None, help="majority, any, all, or a number of methods "
                                                  f"{default(D, 'vote')}."),
    outcome: Optional[str] = typer.Option(None, help="Outcome ranked: <metric>_after, "
                                                     "<metric>_delta or steps_to_forget "
                                                     f"{default(D, 'anchor_outcome')}."),
    pool: Optional[float] = typer.Option(None, help="Share of the samples anchors are chosen "
                                                    "from; the rest stays untouched for "
                                                    f"validation (1 = all) {default(D, 'pool_fraction')}."),
    seed: Optional[int] = typer.Option(None, help=f"Seed of the pool {default(D, 'seed')}."),
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
    out: str = typer.Option("cud-out/anchors", help="Output folder."),
):
    """Choose easy and hard anchors and build their circuits (reusable by `cud score`)."""
    from rich.table import Table

    from cud.folders import folder_lock

    ways = sum([outcomes is not None, bool(easy_ids or hard_ids), bilevel])
    if ways != 1:
        raise ConfigError("give exactly one of --outcomes, --easy-ids/--hard-ids or --bilevel")
    s = settings_from(StudySettings, k=k, vote=vote, anchor_outcome=outcome,
                      pool_fraction=pool, seed=seed)
    folder = out_folder(out, inputs={"--circuits": circuits, "--outcomes": outcomes,
                                     "--easy-ids": easy_ids, "--hard-ids": hard_ids,
                                     "--data": data if bilevel else None})
    with folder_lock(folder):
        chosen, cs, ac = _anchors(circuits, outcomes, method, s, easy_ids, hard_ids, bilevel,
                                  model, data, forget_fraction, n_edges, device, folder)
    table = Table(title=f"anchors {chosen.name}#{chosen.fingerprint} ({chosen.source})")
    for col, justify in (("side", "left"), ("samples", "right"), ("circuit edges", "right"),
                         ("ids", "left")):
        table.add_column(col, justify=justify)
    for side, ids, circ in (("easy", chosen.easy, ac.easy_circuit),
                            ("hard", chosen.hard, ac.hard_circuit)):
        shown = ", ".join(ids[:6]) + (" …" if len(ids) > 6 else "")
        table.add_row(side, str(len(ids)), str(int(circ.sum())), shown)
    console.print(table)
    held = len(set(cs.ids) - set(chosen.excluded))
    console.print(f"{len(chosen.excluded)} samples informed the choice and are held back from "
                  f"validation; {held} of the circuits' samples are not")
    print(folder)


def _anchors(circuits, outcomes, method, s, easy_ids, hard_ids, bilevel, model, data,
             forget_fraction, n_edges, device, folder):
    """The anchors command's work, while it holds its folder: (the anchors, the circuits, the
    anchors' circuits, written to ``folder``)."""
    from cud.circuits.store import load_circuits
    from cud.difficulty.anchors import anchor_circuits, anchors_from_ids, anchors_from_outcomes
    from cud.difficulty.stage import check_same_texts

    cs = load_circuits(circuits)
    if outcomes is not None:
        check_same_texts(cs, outcomes)
        chosen = anchors_from_outcomes(_outcomes_of(outcomes, method, cs.ids), s.k,
                                       outcome=s.anchor_outcome, vote=s.vote,
                                       pool_fraction=s.pool_fraction, seed=s.seed)
    elif bilevel:
        if not model:
            raise ConfigError("--bilevel needs --model (the model before unlearning)")
        from cud.data.prepare import forget_and_retain
        from cud.difficulty.bilevel import bilevel_anchors
        sets = forget_and_retain(data, forget_fraction=forget_fraction, seed=s.seed)
        forget = [x for x in sets.forget if x.id in set(cs.ids)]
        say_text_cuts(sets.taught, model)
        lm = load(model, device)
        with console.status("bi-level anchor selection (per-sample gradients)"):
            chosen = bilevel_anchors(lm, forget, s.k, retain=sets.retain,
                                     method=(method or "graddiff"), pool_fraction=s.pool_fraction,
                                     seed=s.seed)
    else:
        if not (easy_ids and hard_ids):
            raise ConfigError("give both --easy-ids and --hard-ids")
        chosen = anchors_from_ids(id_list(easy_ids), id_list(hard_ids), known=cs.ids)
    ac = anchor_circuits(chosen, cs.ids, cs.edge_scores, cs.graph, _selection(cs, n_edges),
                         circuit_settings=cs.settings)
    ac.save(folder)
    return chosen, cs, ac


@command
def score(
    circuits: str = typer.Option("cud-out/circuits", help="Circuits folder of the samples to "
                                                          "score (new samples: `cud circuits` "
                                                          "on them first)."),
    anchors: str = typer.Option("cud-out/anchors", help="Anchors folder (`cud anchors --out`, "
                                                        "or the anchors/ of `cud run`)."),
    distance: Optional[str] = typer.Option(None, help="cosine, jaccard, hamming, or 'all' "
                                                      f"{default(D, 'distance')}."),
    weighted: bool = typer.Option(False, help="Compare score-weighted circuits instead of "
                                              "binary ones."),
    n_edges: Optional[int] = typer.Option(None, help="Circuit size for both sides (default: "
                                                     "the anchors')."),
    out: str = typer.Option("cud-out/scores", help="Output folder."),
):
    """Score samples: CUD = d_E / (d_E + d_H), high = hard, no unlearning needed."""
    from dataclasses import replace

    import pandas as pd
    from rich.table import Table

    from cud.circuits.store import load_circuits
    from cud.difficulty.anchors import check_compatible, load_anchors, selection_of
    from cud.difficulty.score import DISTANCES, score_samples
    from cud.folders import folder_lock
    from cud.tables import save_table

    names = list(DISTANCES) if distance == "all" else csv_list(distance) or [D().distance]
    for name in names:
        if name not in DISTANCES:
            raise ConfigError(f"unknown distance '{name}' (choose from "
                              f"{', '.join(DISTANCES)}, all)")
    folder = out_folder(out, inputs={"--circuits": circuits, "--anchors": anchors})
    ac = load_anchors(anchors)
    cs = load_circuits(circuits)
    check_compatible(ac, cs.graph, cs.settings, selection=n_edges is None)
    sel = ac.selection if n_edges is None else replace(ac.selection, n_edges=n_edges)
    own = cs.circuits if selection_of(cs.settings) == sel else None
    with folder_lock(folder):
        tables = [score_samples(cs.ids, cs.edge_scores, ac, distance_name=name,
                                weighted=weighted, circuits=own, selection=sel)
                  for name in names]
        save_table(pd.concat(tables, ignore_index=True), folder / "scores", index=False)
    summary = Table(title=f"CUD of {len(cs.ids)} samples (anchors "
                          f"{ac.anchors.name}#{ac.anchors.fingerprint}, {sel.n_edges} edges"
                          f"{', weighted' if weighted else ''}; 0 = easy, 1 = hard)")
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
    print(folder)


@command
def validate(
    circuits: str = typer.Option("cud-out/circuits", help="Circuits folder of the forget set."),
    outcomes: str = typer.Option("cud-out/unlearning", help="`cud unlearn` output folder "
                                                            "(per-method outcomes)."),
    baselines: Optional[str] = typer.Option(None, help="`cud baselines` folder or table."),
    method: Optional[str] = typer.Option(None, help="Methods to judge against (comma list) "
                                                    "(default: all in --outcomes)."),
    anchors: Optional[str] = typer.Option(None, help="Main anchors folder (default: a vote of "
                                                     "the methods on the pool)."),
    k: Optional[int] = typer.Option(None, help=f"Anchors per method and side {default(D, 'k')}."),
    vote: Optional[str] = typer.Option(None, help="majority, any, all, or a number "
                                                  f"{default(D, 'vote')}."),
    anchor_outcome: Optional[str] = typer.Option(None, help="Outcome anchors are ranked by "
                                                            f"{default(D, 'anchor_outcome')}."),
    outcome: Optional[str] = typer.Option(None, help="Outcomes to judge against "
                                                     f"{default(D, 'outcomes')}."),
    pool: Optional[float] = typer.Option(None, help="Share of samples anchors come from (the "
                                                    "rest is the held-out set; 1 = hold back "
                                                    f"only the anchors) {default(D, 'pool_fraction')}."),
    seed: Optional[int] = typer.Option(None, help="Seed of the pool, the bootstrap and the "
                                                  f"random ranking {default(D, 'seed')}."),
    distance: Optional[str] = typer.Option(None, help="Distance of the main CUD "
                                                      f"{default(D, 'distance')}."),
    weighted: Optional[bool] = typer.Option(None, "--weighted/--binary",
                                            help="Main CUD on score-weighted circuits "
                                                 "(default: binary)."),
    sizes: Optional[str] = typer.Option(None, help="Circuit sizes for the robustness table "
                                                   f"{default(D, 'sizes')}."),
    distances: Optional[str] = typer.Option(None, help="Distances for robustness "
                                                       f"{default(D, 'distances')}."),
    n_boot: Optional[int] = typer.Option(None, help=f"Bootstrap resamples {default(D, 'n_boot')}."),
    ci: Optional[float] = typer.Option(None, help=f"Confidence level {default(D, 'ci')}."),
    predictor: Optional[bool] = typer.Option(None, "--predictor/--no-predictor",
                                             help="Also fit the circuit-feature predictor "
                                                  "(default: on)."),
    pools: Optional[int] = typer.Option(None, help="Anchor pools drawn (seeds SEED, SEED+1, "
                                                   f"...) {default(D, 'pools')}."),
    variants: Optional[bool] = typer.Option(None, "--variants/--no-variants",
                                            help="Also score the CUD variants and choose one "
                                                 "on each pool's validation part (default: "
                                                 "on)."),
    retest: Optional[str] = typer.Option(None, help="Circuits folder of the same samples from "
                                                    "other corrupted prompts (`cud circuits "
                                                    "--seed 1`): the test-retest table."),
    other: list[str] = typer.Option([], help="NAME=FOLDER: other circuits of the same samples "
                                             "(e.g. logprob=circuits-logprob), scored as "
                                             "variant cud_NAME (repeatable)."),
    pilots: Optional[str] = typer.Option(None, help="`cud pilot` folder: each method's pilot "
                                                    "joins the forecast ladder "
                                                    "(validation/ladder.csv)."),
    prices: Optional[str] = typer.Option(None, help="JSON file {estimate: seconds per sample} "
                                                    "for folders made before prices were kept "
                                                    "(e.g. circuits, loss, grad_norm, mrd from "
                                                    "stage times); measured prices win."),
    ladder: Optional[bool] = typer.Option(None, "--ladder/--no-ladder",
                                          help="The forecast ladder: every estimate at its "
                                               "price, learned forecasters per method "
                                               "(default: on)."),
    split_method: Optional[str] = typer.Option(None, help="Also run the easy/hard split "
                                                          "protocol with this method (needs "
                                                          "--model)."),
    model: Optional[str] = typer.Option(None, help="The model before unlearning (split "
                                                   "protocol)."),
    data: str = typer.Option("builtin", help="QA data of the unlearning run (split protocol: "
                                             "samples without outcomes are the retain set)."),
    hyperparameters: str = typer.Option("quick", help="Unlearning hyperparameters (split "
                                                      "protocol)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (split protocol)."),
    out: str = typer.Option("cud-out/validation", help="Output folder (anchors/ and scores/ "
                                                       "inside it too)."),
):
    """Judge CUD and every baseline on held-out samples; robustness; optional split protocol."""
    from cud.circuits.store import load_circuits
    from cud.difficulty.stage import check_same_texts, forecast_inputs, validate_to_folder
    from cud.folders import folder_lock
    from cud.tables import read_table

    if split_method and not model:
        raise ConfigError("--split-method needs --model (the model before unlearning)")
    settings = settings_from(
        StudySettings, k=k, vote=vote, anchor_outcome=anchor_outcome, pool_fraction=pool,
        seed=seed, outcomes=tuple(csv_list(outcome)) if outcome else None, distance=distance,
        weighted=weighted, sizes=int_list(sizes, "--sizes"),
        distances=tuple(csv_list(distances)) if distances else None, n_boot=n_boot, ci=ci,
        predictor=predictor, pools=pools, variants=variants, ladder=ladder)
    paths = {}
    for item in other:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--other expects NAME=FOLDER, got '{item}'")
        paths[name] = path
    folder = out_folder(out, inputs={
        "--circuits": circuits, "--outcomes": outcomes, "--baselines": baselines,
        "--anchors": anchors, "--retest": retest, "--pilots": pilots, "--prices": prices,
        **({"--data": data} if split_method else {}),
        **{f"--other {name}=": path for name, path in paths.items()}},
        writes=("anchors", "scores"))
    cs = load_circuits(circuits)
    others = {name: load_circuits(path) for name, path in paths.items()}
    check_same_texts(cs, outcomes)
    tables = _outcomes_of(outcomes, method, cs.ids)
    base = read_table(baselines, what="baselines", names=("baselines",)) if baselines else None
    main = None
    if anchors:
        from cud.difficulty.anchors import check_compatible, load_anchors
        ac = load_anchors(anchors)
        check_compatible(ac, cs.graph, cs.settings)
        main = ac.anchors
    forecast = forecast_inputs(circuits=circuits, baselines=baselines, unlearning=outcomes,
                               pilots=pilots)
    if prices:
        forecast.prices.estimates = {**_prices_file(prices), **forecast.prices.estimates}
    with folder_lock(folder):  # the study and the split protocol, one writer
        with progress_bars() as bar:
            study = validate_to_folder(cs, tables, folder, settings, baselines=base,
                                       anchors=main,
                                       retest=load_circuits(retest) if retest else None,
                                       others=others, forecast=forecast, progress=bar)
        split = None
        if split_method:
            split = _split_protocol(study, tables, split_method, model, data,
                                    hyperparameters, device, folder)
    _validation_summary(study, settings, list(tables))
    _ladder_summary(study, settings)
    if split is not None:
        console.print(f"easy/hard split protocol ({split_method}):")
        console.print(split.summary.round(3).to_string(index=False))
        console.print(split.tests.round(4).to_string(index=False))
    print(folder)


def _validation_summary(study, settings: StudySettings, methods: list[str]) -> None:
    from rich.table import Table

    from cud.difficulty.validation import mean_off_diagonal

    first = settings.outcomes[0]
    h = study.heldout
    t = Table(title=f"held-out: Spearman ρ [{settings.ci:.0%} CI] of each metric with each "
                    f"method's difficulty ({first}; n = {len(study.held_out)} held-out samples; "
                    f"sign = direction read from the anchors)")
    t.add_column("metric")
    for m in methods:
        t.add_column(m, justify="right")
    t.add_column("AUROC (mean over methods)", justify="right")
    for metric in h["metric"].unique():
        rows = h[(h["metric"] == metric) & (h["outcome"] == first)].set_index("method")
        sign = "+" if rows["direction"].iloc[0] > 0 else "−"
        t.add_row(f"{metric} ({sign})", *(fmt_ci(rows.loc[m, "spearman"],
                                                 rows.loc[m, "spearman_lo"],
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


def _prices_file(path: str) -> dict[str, float]:
    import json
    import math

    from cud.errors import DataError
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DataError(f"unreadable prices file ({e.strerror or e})", file=path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"not JSON ({e.msg})", file=path, line=e.lineno) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object {estimate: seconds per sample}", file=path)
    out = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise DataError(f"expected seconds per sample (a number >= 0), got {value!r}",
                            file=path, field=str(name))
        out[str(name)] = float(value)
    return out


def _ladder_summary(study, settings: StudySettings) -> None:
    """Per method, the best forecast at each price tier and the paired test against the best
    single baseline; collapsed methods flagged."""
    from rich.table import Table

    from cud.difficulty.ladder import best_per_tier

    if study.ladder.empty:
        return
    first = settings.outcomes[0]
    best = best_per_tier(study.ladder, first)
    t = Table(title=f"forecast ladder ({first}): the best estimate at each price, held-out ρ, "
                    f"and against the best single baseline (paired bootstrap); all rows in "
                    f"ladder.csv")
    for col in ("method", "price", "best estimate", "s / sample", "ρ [95% CI]", "vs", "Δρ",
                "p"):
        t.add_column(col, justify="right" if col in ("s / sample", "Δρ", "p") else "left")
    for r in best.to_dict("records"):
        name = r["method"] + (" (collapsed)" if r["collapsed"] else "")
        t.add_row(name, r["tier_label"], r["estimate"], f"{r['seconds_per_sample']:.3g}",
                  fmt_ci(r["spearman"], r["spearman_lo"], r["spearman_hi"]), r["versus"],
                  "–" if r["estimate"] == r["versus"] else f"{r['diff']:+.2f}",
                  "–" if r["estimate"] == r["versus"] else f"{r['p']:.3g}")
    console.print(t)


def _split_protocol(study, tables, method, model, data, table_name, device, out_dir: Path):
    from cud.data.prepare import load_samples
    from cud.difficulty.split import split_protocol_to_folder

    samples = load_samples(data)
    with_outcome = {i for t in tables.values() for i in t.index}
    retain = [s for s in samples if s.id not in with_outcome]
    say_text_cuts(samples, model)
    lm = load(model, device)
    with progress_bars() as bar:
        return split_protocol_to_folder(lm, study, samples, retain, out_dir, method=method,
                                        hyperparameter_table=table_name, progress=bar)
