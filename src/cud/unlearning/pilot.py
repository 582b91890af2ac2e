"""A pilot of an unlearning method: the method itself on the whole forget set, with the full
run's hyperparameters, learning-rate schedule and seed, stopped after a fraction of its
optimizer steps; each sample's teacher-forced answer NLL is recorded at several fractions on the
way (no greedy answers, no truth ratio: they are what makes the full evaluation expensive).

Because the schedule is the full run's and the loop draws the same batches from the same seed,
the pilot's first k steps are exactly the full run's first k steps: its NLL at fraction f is the
full run's trajectory at step round(f x total steps). The forecast built on it lives with the
other difficulty estimates (:mod:`cud.difficulty.pilot`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import pandas as pd

from cud.data.samples import QASample
from cud.errors import ConfigError
from cud.models.loading import LoadedModel
from cud.progress import Progress
from cud.unlearning.hyperparameters import DEFAULT_TABLE
from cud.unlearning.loop import TrainConfig
from cud.unlearning.methods import UnlearningMethod
from cud.unlearning.run import (forget_set_nll, method_and_config, start_unlearning,
                                train_method)


def pilot_name(fraction: float) -> str:
    """The score's name at ``fraction`` of the steps: ``pilot_<percent>`` (0.05 -> pilot_5)."""
    return f"pilot_{fraction * 100:g}"


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Sorted distinct fractions, each in (0, 1]."""
    out = tuple(sorted({float(f) for f in fractions}))
    if not out:
        raise ConfigError("a pilot needs at least one fraction of the steps")
    bad = [f for f in out if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"pilot fractions must be in (0, 1], got {bad}")
    return out


def pilot_steps(total: int, fractions: Sequence[float]) -> dict[float, int]:
    """Fraction -> the optimizer step it stops at: f x ``total`` rounded half up, at least 1
    (several small fractions of a short run can land on the same step)."""
    return {f: min(total, max(1, math.floor(f * total + 0.5))) for f in check_fractions(fractions)}


@dataclass
class PilotResult:
    """What one pilot did. ``trajectory``: long table ``step, id, nll`` (step 0 = before);
    ``rise``: index id, one column per fraction (:func:`pilot_name`), the NLL at that fraction's
    step minus the NLL before (higher = more forgotten so far); ``seconds``: per fraction, the
    wall seconds a pilot stopping there costs (setting up, the training steps up to it, and the
    evaluations before and at it: the other fractions' evaluations are left out)."""

    method: str
    total_steps: int
    steps: dict[float, int]
    trajectory: pd.DataFrame
    rise: pd.DataFrame
    seconds: dict[float, float]
    train_config: TrainConfig
    hyperparameters: dict = field(default_factory=dict)


def pilot(lm: LoadedModel, forget: Sequence[QASample], retain: Sequence[QASample] | None = None,
          *, method: str | UnlearningMethod = "graddiff", fractions: Sequence[float],
          hyperparameter_table: str = DEFAULT_TABLE, hyperparameters: dict | None = None,
          train_config: TrainConfig | None = None, batch_size: int = 16,
          progress: Progress | None = None,
          trajectory_sink: Callable[[pd.DataFrame], None] | None = None) -> PilotResult:
    """Run ``method`` as :func:`cud.unlearning.run.unlearn` would (same resolution of the
    table, ``hyperparameters`` and ``train_config``), stop after the largest fraction's step and
    return every sample's NLL at step 0 and at each fraction's step. ``lm`` is left untouched.
    ``trajectory_sink`` receives each evaluation's rows as they are made."""
    start = time.perf_counter()
    unlearning, config = method_and_config(method, hyperparameter_table, hyperparameters,
                                           train_config, forget, retain)
    config = replace(config, eval_every=None)
    total = config.total_steps(len(forget))
    steps = pilot_steps(total, fractions)
    wanted = sorted(set(steps.values()))
    net, work, reference = start_unlearning(lm, unlearning)
    rows: list[pd.DataFrame] = []
    clock: dict[int, tuple[float, float]] = {}   # step -> (evaluation start, end)

    def evaluate(step: int) -> None:
        began = time.perf_counter()
        nll = forget_set_nll(work, forget, batch_size)
        frame = pd.DataFrame({"step": step, "id": list(nll), "nll": list(nll.values())})
        rows.append(frame)
        clock[step] = (began, time.perf_counter())
        if trajectory_sink is not None:
            trajectory_sink(frame)

    train_method(lm, net, unlearning, forget, retain, config, evaluate=evaluate,
                 progress=progress, stop_after=wanted[-1], eval_steps=wanted)
    del reference, net
    unlearning.reference = None
    trajectory = pd.concat(rows, ignore_index=True)
    nll = trajectory.pivot(index="id", columns="step", values="nll")
    ids = [s.id for s in forget]
    rise = pd.DataFrame({pilot_name(f): (nll[k] - nll[0]).reindex(ids) for f, k in steps.items()})
    rise.index.name = "id"

    def cost(k: int) -> float:  # setup + training to step k + the evaluations at 0 and k
        between = sum(end - began for s, (began, end) in clock.items() if 0 < s < k)
        return clock[k][1] - start - between

    return PilotResult(method=unlearning.name, total_steps=total, steps=steps,
                       trajectory=trajectory, rise=rise,
                       seconds={f: cost(k) for f, k in steps.items()},
                       train_config=replace(config),
                       hyperparameters=unlearning.hyperparameters())
