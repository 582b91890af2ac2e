"""Calibrating an unlearning method's learning rate before its outcomes are used as ground truth,
and flagging a method that destroyed the model (``collapsed``).

A rate that forgets by wrecking the model gives outcomes that describe a broken model, not the
samples (RMU at the ``tofu`` table's rate raised the retain NLL by 8.7 nats, notes/tofu.md).
The calibration chooses, from a small grid of rates (multiples of the method's own rate), the
**largest rate whose mean retain NLL rise stays within a budget**, measured on a *held part* of
the retain set that no run trains on (a seeded share of it, :func:`held_retain`). The grid is
scanned from the largest rate down and stops at the first rate within the budget: that is by
definition the rate a brute-force run of the whole grid picks (the largest within budget),
at fewer runs. When no rate of the grid is within the budget the smallest is used and the method
is flagged collapsed; any method whose retain NLL rise exceeds the budget is flagged collapsed,
calibrated or not (:func:`is_collapsed`), so its outcomes are never used silently.

Defaults (``[unlearning]`` settings of :class:`cud.unlearning.folder.UnlearningSettings`):
a budget of :data:`DEFAULT_BUDGET` nats (mean over the held retain samples), the grid
:data:`DEFAULT_GRID` x the method's rate, :data:`DEFAULT_HELD` of the retain set held out.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from cud.data.samples import QASample
from cud.errors import ConfigError
from cud.models.loading import LoadedModel
from cud.progress import Progress
from cud.unlearning.hyperparameters import DEFAULT_TABLE
from cud.unlearning.loop import TrainConfig
from cud.unlearning.methods import UnlearningMethod
from cud.unlearning.run import Trained, forget_set_nll, method_and_config, train_unlearning

#: mean retain NLL rise (nats per answer token) a usable unlearning may cost. On TOFU forget10
#: (notes/tofu.md) the four methods that kept the model usable rose by 0.07-0.57 and RMU's
#: collapse by 8.70; on the built-in data (notes/unlearning.md) the quick table's methods by
#: -0.14 to +0.47 and RMU at 1e-3, which collapsed the model, by +5. One nat lies between
#: with room on both sides: the retain answers' probability may fall by a factor e at most.
DEFAULT_BUDGET = 1.0
#: the rates tried, as multiples of the method's own rate (never above it), largest first
DEFAULT_GRID = (1.0, 0.5, 0.2, 0.1, 0.05)
#: share of the retain set held out of training to measure the rise on
DEFAULT_HELD = 0.2


def check_calibration(grid: Sequence[float], budget: float, held: float) -> None:
    if not grid or any(not (g > 0 and math.isfinite(g)) for g in grid):
        raise ConfigError(f"calibration_grid: give positive multiples of the rate, got "
                          f"{list(grid)}")
    if not budget > 0:
        raise ConfigError(f"retain_budget must be positive (nats), got {budget}")
    if not 0 < held < 1:
        raise ConfigError(f"calibration_held must be in (0, 1), got {held}")


def held_retain(retain: Sequence[QASample], fraction: float, seed: int = 0
                ) -> tuple[list[QASample], list[QASample]]:
    """(the retain samples trained on, the held part): a seeded random ``fraction`` of the
    retain set (at least one sample, and at least one left to train on), order kept."""
    retain = list(retain)
    if len(retain) < 2:
        raise ConfigError("calibration needs at least 2 retain samples (one held out)")
    n = min(len(retain) - 1, max(1, round(fraction * len(retain))))
    held = set(random.Random(seed).sample(range(len(retain)), n))
    return ([s for k, s in enumerate(retain) if k not in held],
            [s for k, s in enumerate(retain) if k in held])


def is_collapsed(rise: float | None, budget: float) -> bool:
    """Whether a retain NLL rise is over the budget (NaN, a diverged model, counts as over)."""
    return rise is not None and not (math.isfinite(rise) and rise <= budget)


def grid_rates(base_lr: float, grid: Sequence[float]) -> list[float]:
    """The rates of ``grid`` x ``base_lr``, distinct, largest first."""
    return sorted({float(base_lr) * float(g) for g in grid}, reverse=True)


@dataclass
class Calibration:
    """The scan: the rates tried (largest first) and each one's mean retain NLL rise on the
    held part, the rate chosen, whether even the smallest was over the budget."""

    method: str
    base_lr: float
    rates: list[float]
    rises: dict[float, float]
    chosen: float
    collapsed: bool
    budget: float
    held_ids: list[str]
    seconds: float = 0.0
    runs: int = 0                                   # rates trained in this call
    logs: dict = field(default_factory=dict)
    #: the run at the chosen rate, when it was trained in this call and asked to be kept
    trained: Trained | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"method": self.method, "base_lr": self.base_lr, "rates": self.rates,
                "rises": {repr(r): v for r, v in self.rises.items()}, "chosen": self.chosen,
                "collapsed": self.collapsed, "budget": self.budget, "held_ids": self.held_ids,
                "seconds": round(self.seconds, 2)}


def held_rise(lm: LoadedModel, before: float, held: Sequence[QASample], batch_size: int = 16
              ) -> float:
    """Mean teacher-forced answer NLL of ``held`` under ``lm`` minus ``before``."""
    nll = forget_set_nll(lm, held, batch_size)
    return float(np.mean(list(nll.values()))) - before


def calibrate(lm: LoadedModel, forget: Sequence[QASample], retain: Sequence[QASample],
              held: Sequence[QASample], *, method: str | UnlearningMethod = "graddiff",
              hyperparameter_table: str = DEFAULT_TABLE, hyperparameters: dict | None = None,
              train_config: TrainConfig | None = None, grid: Sequence[float] = DEFAULT_GRID,
              budget: float = DEFAULT_BUDGET, batch_size: int = 16,
              known: dict[float, float] | None = None,
              on_rate: Callable[[float, float], None] | None = None,
              keep: bool = False, progress: Progress | None = None) -> Calibration:
    """Choose the rate (see the module docstring). ``retain``: the retain samples training
    reads (the held part left out); ``held``: the held part. Each rate is a full training run of
    the method at that rate (its other settings unchanged). ``known``: rises already measured
    (a resumed calibration), reused; ``on_rate(rate, rise)`` is called after each new run (to
    write as you go). ``keep``: each rate is trained exactly as :func:`cud.unlearning.run.unlearn`
    trains (its trajectory recorded at ``eval_every``), and the run at the chosen rate is kept
    (``trained``), so the method's outcomes need no training of their own: one training fewer
    per calibrated method. Without ``keep`` no trajectory is recorded."""
    check_calibration(grid, budget, 0.5)
    if not held:
        raise ConfigError("calibration needs a held part of the retain set")
    start = time.perf_counter()
    unlearning, config = method_and_config(method, hyperparameter_table, hyperparameters,
                                           train_config, forget, retain)
    rates = grid_rates(config.lr, grid)
    before = float(np.mean(list(forget_set_nll(lm, held, batch_size).values())))
    rises: dict[float, float] = {}
    runs = 0
    chosen = None
    kept: Trained | None = None
    for rate in rates:
        kept = None                        # a model is kept for the last rate tried only
        if known and rate in known:
            rise = float(known[rate])
        else:
            unlearning, _ = method_and_config(method, hyperparameter_table, hyperparameters,
                                              train_config, forget, retain)
            trial = replace(config, lr=rate) if keep else replace(config, lr=rate,
                                                                  eval_every=None)
            run = train_unlearning(lm, forget, retain, unlearning, trial,
                                   batch_size=batch_size, progress=progress,
                                   task=f"calibrate {unlearning.name}", trajectory=keep)
            rise = held_rise(run.work, before, held, batch_size)
            kept = run if keep else None
            del run
            runs += 1
            if on_rate is not None:
                on_rate(rate, rise)
        rises[rate] = rise
        if not is_collapsed(rise, budget):
            chosen = rate
            break
    collapsed = chosen is None
    chosen = rates[-1] if collapsed else chosen
    if kept is not None and kept.config.lr != chosen:
        kept = None
    return Calibration(method=unlearning.name, base_lr=config.lr, rates=rates, rises=rises,
                       chosen=chosen, collapsed=collapsed, budget=budget,
                       held_ids=[s.id for s in held], seconds=time.perf_counter() - start,
                       runs=runs, trained=kept)
