"""Read a report's inputs from the folders and files the other commands write. Every input is
optional; a path that is given but cannot be read is an error that names it.

- circuits: a ``cud circuits`` folder (:func:`cud.circuits.store.load_circuits`);
- cud: the ``scores`` table of ``cud score`` (``.parquet`` or ``.csv``; columns ``id``, ``cud``,
  optionally ``d_E``, ``d_H``, ``distance``, ``anchor_role``) or the folder holding it. A table
  with several distances is cut to one (``distance``, default cosine). Without anchors, the
  ``anchor_role`` column names them;
- anchors: an anchors folder (:func:`cud.difficulty.anchors.load_anchors`: ids and the anchor
  circuits C_E, C_H) or a JSON file ``{"easy": [...], "hard": [...], "excluded"?: [...]}``;
- unlearn: a ``cud unlearn`` folder (``<method>/outcomes.parquet``);
- baselines: ``baselines.parquet``/``.csv`` from ``cud baselines`` or its folder;
- data: a QA data spec (:func:`cud.data.load_qa`) for the samples' text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cud.errors import DataError
from cud.report.html import ReportInputs
from cud.tables import read_table

CUD_TABLE_NAMES = ("scores", "cud")


def read_anchor_ids(path: str | Path) -> dict:
    """``{"easy", "hard", "excluded"}`` id lists from an anchors JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"unreadable anchors file ({e})", file=str(path)) from None
    data = data.get("anchors", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not {"easy", "hard"} <= set(data):
        raise DataError("an anchors file needs lists 'easy' and 'hard'", file=str(path))
    return {k: [str(i) for i in data.get(k, [])] for k in ("easy", "hard", "excluded")}


def one_distance(table: pd.DataFrame, distance: str | None = None, *, source: str = ""
                 ) -> pd.DataFrame:
    """The rows of one distance of a CUD table (index id), one row per id."""
    if "distance" in table.columns:
        present = list(dict.fromkeys(table["distance"].astype(str)))
        pick = distance or ("cosine" if "cosine" in present else present[0])
        if pick not in present:
            raise DataError(f"no CUD with distance '{pick}' (the table has "
                            f"{', '.join(present)})", file=source, field="distance")
        table = table[table["distance"].astype(str) == pick]
    elif distance is not None:
        raise DataError("the CUD table has no 'distance' column to choose from", file=source)
    if table.index.duplicated().any():
        raise DataError("the CUD table has several rows per sample id; keep one CUD per sample",
                        file=source)
    return table


def load_report_inputs(*, circuits: str | Path | None = None, cud: str | Path | None = None,
                       distance: str | None = None, anchors: str | Path | None = None,
                       unlearn: str | Path | None = None, methods: list[str] | None = None,
                       baselines: str | Path | None = None,
                       validation: str | Path | None = None, data: str | None = None,
                       split: str | None = None,
                       strategy: str | Path | None = None) -> ReportInputs:
    """Everything :func:`cud.report.html.build_report` can use, from paths (see the module
    docstring); ``methods`` picks unlearning methods from ``unlearn``; ``distance`` picks the
    CUD of one distance; ``strategy``: a strategy's ``comparison.csv``."""
    out = ReportInputs()
    if circuits is not None:
        from cud.circuits.store import load_circuits
        cs = load_circuits(circuits)
        out.graph, out.ids = cs.graph, list(cs.ids)
        out.circuits, out.edge_scores = cs.circuits.numpy(), cs.edge_scores.numpy()
        out.sources["circuits"] = str(circuits)
    if cud is not None:
        table = read_table(cud, what="CUD", names=CUD_TABLE_NAMES)
        if "cud" not in table.columns:
            raise DataError("the CUD table has no 'cud' column", file=str(cud))
        out.cud = one_distance(table, distance, source=str(cud))
        out.sources["cud"] = str(cud)
    if anchors is not None:
        path = Path(anchors)
        if path.is_dir():
            from cud.difficulty.anchors import load_anchors
            loaded = load_anchors(path)
            out.anchors = {"easy": list(loaded.anchors.easy), "hard": list(loaded.anchors.hard)}
            out.excluded = list(loaded.anchors.excluded)
            if out.graph is not None and loaded.graph.cfg != out.graph.cfg:
                raise DataError(f"the anchors were made on another graph ({loaded.graph.cfg}) "
                                f"than the circuits ({out.graph.cfg})", file=str(path))
            out.graph = out.graph or loaded.graph
            out.anchor_circuits = {"easy": loaded.easy_circuit.numpy(),
                                   "hard": loaded.hard_circuit.numpy()}
        else:
            ids = read_anchor_ids(path)
            out.anchors = {"easy": ids["easy"], "hard": ids["hard"]}
            out.excluded = ids["excluded"] or ids["easy"] + ids["hard"]
        out.sources["anchors"] = str(anchors)
    if out.anchors is None and out.cud is not None and "anchor_role" in out.cud.columns:
        role = out.cud["anchor_role"].fillna("").astype(str)
        if (role == "easy").any() and (role == "hard").any():
            out.anchors = {"easy": role.index[role == "easy"].tolist(),
                           "hard": role.index[role == "hard"].tolist()}
            out.excluded = out.anchors["easy"] + out.anchors["hard"]
            out.sources["anchors"] = f"{cud} (anchor_role; give --anchors for the anchor " \
                                     f"circuits and held-out samples)"
    if unlearn is not None:
        from cud.difficulty.groundtruth import read_outcomes
        out.outcomes = read_outcomes(unlearn, methods)
        out.sources["outcomes"] = str(unlearn)
    if baselines is not None:
        out.baselines = read_table(baselines, what="baselines", names=("baselines",))
        out.sources["baselines"] = str(baselines)
    if validation is not None:
        from cud.difficulty.study import read_study
        out.study = read_study(validation)
        out.sources["validation"] = str(validation)
    if strategy is not None:
        try:
            out.strategy = pd.read_csv(strategy)
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable strategy comparison ({type(e).__name__})",
                            file=str(strategy)) from None
        out.sources["strategy"] = str(strategy)
    if data is not None:
        from cud.data import load_qa
        samples = load_qa(data, split=split)
        out.samples = pd.DataFrame({"question": [s.question for s in samples],
                                    "answer": [s.answer for s in samples]},
                                   index=pd.Index([s.id for s in samples], name="id"))
        out.sources["samples"] = str(data)
    return out
