"""The difficulty the TOFU strategy runs read (notes/act.md), from the committed study alone
(`results/tofu-forget10`; pandas and scikit-learn, no model): per method (GradDiff, NPO), CUD with
that method's own anchors of pool 0 (`per-method/<method>/per_sample.parquet`), and the
pre-unlearning forecaster of the ladder (``forecast_pre``: ridge on ranks over every free,
one-pass and circuit feature, :mod:`cud.difficulty.forecast`) fitted on pool 0's samples (its
anchors left out, as the ladder fits it) and predicted for all 400. Higher = harder.

    python scripts/tofu_strategy_difficulty.py results/tofu-forget10 --out difficulty.csv

Columns: ``id``, ``cud_<method>``, ``forecast_<method>``. The strategies use them through
`cud unlearn --difficulty difficulty.csv:forecast_graddiff` (and the like); the comparison
(`scripts/tofu_strategies.py`) reads ``forecast_<method>`` for the predicted-hard quartile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from cud.difficulty.forecast import (fit_forecaster, forecaster_inputs, one_hot_types,
                                     training_ids)
from cud.difficulty.groundtruth import difficulty
from cud.difficulty.ladder import _forecast_table  # the ladder's forecaster inputs of a pool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tofu_ladder import views_of  # noqa: E402  (the ladder's own view of each pool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--methods", default="graddiff,npo")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    root = args.root
    c = pd.read_parquet(root / "circuits_samples.parquet").set_index("id")
    c.index = c.index.astype(str)
    info = pd.DataFrame({"question_length": (c["n_tokens"] - c["n_answer_tokens"]).astype(float),
                         "question_type": c["question_type"]})
    structure = pd.read_parquet(root / "structure.parquet")
    structure.index = structure.index.astype(str)
    features = structure.add_prefix("s_").join(one_hot_types(c["question_type"]))
    out = pd.DataFrame(index=pd.Index(sorted(c.index), name="id"))
    for m in args.methods.split(","):
        view = views_of(root, m, info, features)[0]
        out[f"cud_{m}"] = view.scores["cud"].reindex(out.index)
        table = _forecast_table(view)
        cols = forecaster_inputs(table.columns)["forecast_pre"]
        truth = difficulty(pd.read_parquet(root / f"outcomes_{m}.parquet"), "nll_after")
        fit = fit_forecaster(table[cols], truth,
                             train=training_ids(view.pool, view.easy + view.hard, cols),
                             predict=list(out.index))
        out[f"forecast_{m}"] = fit.predictions.reindex(out.index)
        print(f"{m}: forecaster fitted on {len(fit.train_ids)} pool samples, {len(cols)} "
              f"features", file=sys.stderr)
    out.reset_index().to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
