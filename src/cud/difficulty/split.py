"""The paper's protocol (METHOD §8): split a forget set into CUD-easy and CUD-hard halves, unlearn
each with the same method and budget, and compare what happened.

The halves have equal size (the median sample is left out when the count is odd), so the same
training settings give both the same number of optimizer steps. Compared, with a test each:

- forget efficacy, per forget sample of each half: the answer-NLL increase and the answer
  probability after (Mann-Whitney U, two-sided: different samples in the two halves), and the
  share forgotten (probability below the threshold; Fisher's exact test);
- retain performance and general knowledge, per retain / general sample: the NLL increase under
  the run on the easy half against the run on the hard half (Wilcoxon signed-rank, paired: the
  same samples under two models).

Expectation if CUD works: the easy half's NLL rises more, and unlearning it costs the retain set
and general knowledge no more than unlearning the hard half.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from cud.data.samples import QASample
from cud.errors import ConfigError, DataError
from cud.folders import folder_lock, write_text
from cud.progress import Progress
from cud.models.loading import LoadedModel
from cud.unlearning.hyperparameters import DEFAULT_TABLE
from cud.unlearning.loop import TrainConfig
from cud.models.answers import teacher_forced_outcomes
from cud.unlearning.run import DEFAULT_FORGET_THRESHOLD, unlearn


def split_halves(scores: pd.Series) -> tuple[list[str], list[str]]:
    """(easy, hard): the ⌊n/2⌋ lowest-CUD and ⌊n/2⌋ highest-CUD ids (ties by id)."""
    frame = pd.DataFrame({"score": scores.to_numpy(dtype=float),
                          "id": scores.index.astype(str)}).dropna()
    order = frame.sort_values(["score", "id"])["id"].tolist()
    half = len(order) // 2
    if half < 1:
        raise ConfigError(f"the easy/hard split needs at least 2 scored samples, got "
                          f"{len(order)}")
    return order[:half], order[len(order) - half:]


@dataclass
class SplitResult:
    forget: pd.DataFrame     # per forget sample: half, cud, nll/prob before and after, delta
    retain: pd.DataFrame     # per retain sample: nll before and after each run
    general: pd.DataFrame    # per general-knowledge sample: the same
    summary: pd.DataFrame    # per half: means of everything
    tests: pd.DataFrame      # quantity, test, statistic, p, mean easy, mean hard
    settings: dict


def _nll(lm: LoadedModel, samples: Sequence[QASample], batch_size: int) -> pd.Series:
    if not samples:
        return pd.Series(dtype=float)
    return teacher_forced_outcomes(lm, samples, batch_size=batch_size)["nll"]


def _wilcoxon(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    d = (a - b).dropna()
    if len(d) < 2 or np.allclose(d, 0):
        return np.nan, np.nan
    r = stats.wilcoxon(a.loc[d.index], b.loc[d.index])
    return float(r.statistic), float(r.pvalue)


def easy_hard_protocol(lm: LoadedModel, forget: Sequence[QASample], scores: pd.Series, *,
                       retain: Sequence[QASample] = (), general: Sequence[QASample] = (),
                       method: str = "graddiff", hyperparameter_table: str = DEFAULT_TABLE,
                       train_config: TrainConfig | None = None,
                       hyperparameters: dict | None = None,
                       threshold: float = DEFAULT_FORGET_THRESHOLD, batch_size: int = 16,
                       progress: Progress | None = None
                       ) -> SplitResult:
    """Run the protocol on the ``forget`` samples that have a score in ``scores`` (CUD, high =
    hard). ``retain`` is kept by the method (where it uses one) and measured; ``general`` is
    measured only. The model ``lm`` is left untouched."""
    by_id = {s.id: s for s in forget}
    scored = scores[[i for i in scores.index.astype(str) if i in by_id]]
    easy_ids, hard_ids = split_halves(scored)
    retain, general = list(retain), list(general)
    retain_before = _nll(lm, retain, batch_size)
    general_before = _nll(lm, general, batch_size)
    forget_rows, retain_after, general_after, runs = [], {}, {}, {}
    for half, half_ids in (("easy", easy_ids), ("hard", hard_ids)):
        report = (lambda task, s, t, info, half=half: progress(f"{half} half", s, t, info)) \
            if progress else None
        result = unlearn(lm, [by_id[i] for i in half_ids], retain or None, method=method,
                         hyperparameter_table=hyperparameter_table, train_config=train_config,
                         hyperparameters=hyperparameters, metrics=("nll", "prob", "exact_mem"),
                         forget_threshold=threshold, batch_size=batch_size, progress=report)
        d = result.deltas
        forget_rows.append(pd.DataFrame({
            "half": half, "cud": scored.reindex(d.index).to_numpy(),
            "nll_before": d["nll_before"], "nll_after": d["nll_after"],
            "nll_delta": d["nll_delta"], "prob_after": d["prob_after"],
            "forgotten": d["prob_after"] < threshold}, index=d.index))
        retain_after[half] = _nll(result.model, retain, batch_size)
        general_after[half] = _nll(result.model, general, batch_size)
        runs[half] = {"steps": result.log.total_steps, "n": len(half_ids),
                      "seconds": round(result.log.seconds, 2)}
        del result
    table = pd.concat(forget_rows)
    table.index.name = "id"
    easy, hard = table[table["half"] == "easy"], table[table["half"] == "hard"]

    def side(before: pd.Series, after: dict[str, pd.Series]) -> pd.DataFrame:
        out = pd.DataFrame({"nll_before": before})
        for h in ("easy", "hard"):
            out[f"nll_after_{h}"] = after[h]
            out[f"nll_delta_{h}"] = after[h] - before
        return out

    retain_t, general_t = side(retain_before, retain_after), side(general_before, general_after)
    tests = []
    for col, label in (("nll_delta", "forget NLL increase"), ("prob_after", "forget prob after")):
        u = stats.mannwhitneyu(easy[col], hard[col], alternative="two-sided")
        tests.append({"quantity": label, "test": "Mann-Whitney U", "statistic": float(u.statistic),
                      "p": float(u.pvalue), "mean_easy": float(easy[col].mean()),
                      "mean_hard": float(hard[col].mean())})
    f = stats.fisher_exact([[int(easy["forgotten"].sum()), int((~easy["forgotten"]).sum())],
                            [int(hard["forgotten"].sum()), int((~hard["forgotten"]).sum())]])
    tests.append({"quantity": "share forgotten", "test": "Fisher exact",
                  "statistic": float(f.statistic), "p": float(f.pvalue),
                  "mean_easy": float(easy["forgotten"].mean()),
                  "mean_hard": float(hard["forgotten"].mean())})
    for name, t in (("retain", retain_t), ("general", general_t)):
        if t.empty:
            continue
        w, p = _wilcoxon(t["nll_delta_easy"], t["nll_delta_hard"])
        tests.append({"quantity": f"{name} NLL increase", "test": "Wilcoxon signed-rank (paired)",
                      "statistic": w, "p": p, "mean_easy": float(t["nll_delta_easy"].mean()),
                      "mean_hard": float(t["nll_delta_hard"].mean())})
    summary = pd.DataFrame([{
        "half": h, "n": len(part), "cud_mean": part["cud"].mean(),
        "forget_nll_before": part["nll_before"].mean(), "forget_nll_delta": part["nll_delta"].mean(),
        "forget_prob_after": part["prob_after"].mean(), "forgotten": part["forgotten"].mean(),
        "retain_nll_delta": retain_t[f"nll_delta_{h}"].mean() if len(retain_t) else np.nan,
        "general_nll_delta": general_t[f"nll_delta_{h}"].mean() if len(general_t) else np.nan,
    } for h, part in (("easy", easy), ("hard", hard))])
    settings = {"method": method, "table": hyperparameter_table, "threshold": threshold,
                "easy": easy_ids, "hard": hard_ids, "runs": runs}
    return SplitResult(forget=table, retain=retain_t, general=general_t, summary=summary,
                       tests=pd.DataFrame(tests), settings=settings)


def split_protocol_to_folder(lm: LoadedModel, study, forget: Sequence[QASample],
                             retain: Sequence[QASample], out_dir: str | Path, *, method: str,
                             hyperparameter_table: str = DEFAULT_TABLE,
                             progress: Progress | None = None) -> SplitResult:
    """The protocol as a stage (`cud validate --split-method`, ``[study] split_method`` of
    `cud run`): split the study's held-out samples (``study``: a
    :class:`~cud.difficulty.study.StudyResult`) by their CUD, unlearn each half with
    ``method``, keep and measure ``retain`` and general knowledge, and write
    ``split_forget``, ``split_summary``, ``split_tests`` (Parquet and CSV) and ``split.json``
    into ``out_dir``."""
    from cud.data.general import general_knowledge
    from cud.tables import save_table

    held = set(study.held_out)
    forget = [s for s in forget if s.id in held]
    if len(forget) < 2:
        raise DataError(f"only {len(forget)} held-out samples have outcomes and a CUD; is the "
                        f"data the one the unlearning run used?")
    scores = study.metrics.loc[study.metrics["held_out"], "cud"]
    out_dir = Path(out_dir)
    with folder_lock(out_dir):  # one process at a time writes into the folder
        result = easy_hard_protocol(lm, forget, scores, retain=retain,
                                    general=general_knowledge(), method=method,
                                    hyperparameter_table=hyperparameter_table,
                                    progress=progress)
        save_table(result.forget, out_dir / "split_forget", index=True)
        save_table(result.summary, out_dir / "split_summary", index=False)
        save_table(result.tests, out_dir / "split_tests", index=False)
        write_text(out_dir / "split.json", json.dumps(result.settings, indent=1) + "\n")
    return result
