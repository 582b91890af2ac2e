"""Run one unlearning method on a forget set and measure what it did to each sample.

``unlearn`` = outcomes before -> training (with an optional per-sample NLL trajectory on the
forget set every k steps) -> outcomes after -> per-sample deltas and *steps to forget*.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from cud.data.encoding import batches, encode_samples
from cud.data.samples import QASample
from cud.errors import ConfigError
from cud.models.loading import LoadedModel, prepare
from cud.unlearning.loop import TrainConfig, TrainLog, TrainPlan, train
from cud.unlearning.methods import UnlearningMethod, make_method
from cud.unlearning.outcomes import ALL_METRICS, evaluate_outcomes, outcome_deltas
from cud.unlearning.hyperparameters import DEFAULT_TABLE
from cud.unlearning.hyperparameters import hyperparameters as table_of
from cud.models.answers import answer_logits
from cud.progress import Progress

#: a sample counts as forgotten once its normalised answer probability falls below this (ours)
DEFAULT_FORGET_THRESHOLD = 0.1


@dataclass
class UnlearningResult:
    """What one unlearning run produced. Tables are indexed by sample id."""

    model: LoadedModel           # the unlearned model
    method: UnlearningMethod
    train_config: TrainConfig
    before: pd.DataFrame         # forget-set outcomes before unlearning
    after: pd.DataFrame          # ... and after
    deltas: pd.DataFrame         # {metric}_before / _after / _delta per sample
    trajectory: pd.DataFrame     # long table: step, id, nll, prob (evaluation steps only)
    steps_to_forget: pd.Series   # first evaluated step with prob < threshold (NaN: never)
    log: TrainLog
    retain_before: pd.DataFrame | None = None
    retain_after: pd.DataFrame | None = None
    settings: dict = field(default_factory=dict)

    def per_sample(self) -> pd.DataFrame:
        """One table: deltas plus steps to forget (the per-sample ground truth)."""
        out = self.deltas.copy()
        out["steps_to_forget"] = self.steps_to_forget.reindex(out.index)
        return out


def forget_set_nll(lm: LoadedModel, samples: Sequence[QASample], batch_size: int = 16
                   ) -> dict[str, float]:
    """Per-sample answer NLL (no gradient); the cheap quantity tracked along a trajectory."""
    encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    out = {}
    with torch.no_grad():
        for batch in batches(encoded, batch_size, lm.pad_token_id):
            nll = answer_logits(lm.model, batch.to(lm.device)).nll()
            out.update(zip(batch.ids, nll.tolist()))
    return out


#: what is measured on the retain set before and after unlearning
RETAIN_METRICS = ("nll", "prob", "exact_mem")


def retain_outcomes(lm: LoadedModel, retain: Sequence[QASample], batch_size: int = 16,
                    bf16: bool = False) -> pd.DataFrame:
    """The teacher-forced :data:`RETAIN_METRICS` of ``lm`` on the retain set."""
    return evaluate_outcomes(lm, retain, metrics=RETAIN_METRICS, batch_size=batch_size,
                             bf16=bf16)


def steps_to_forget(trajectory: pd.DataFrame, threshold: float = DEFAULT_FORGET_THRESHOLD
                    ) -> pd.Series:
    """First evaluated step at which a sample's normalised answer probability is below
    ``threshold``; NaN when it never is (censored at the last step)."""
    below = trajectory[trajectory["prob"] < threshold]
    first = below.groupby("id")["step"].min()
    ids = pd.Index(trajectory["id"].unique(), name="id")
    return first.reindex(ids).rename("steps_to_forget")


def method_and_config(method: str | UnlearningMethod, hyperparameter_table: str = DEFAULT_TABLE,
                      hyperparameters: dict | None = None,
                      train_config: TrainConfig | None = None,
                      forget: Sequence[QASample] = (), retain: Sequence[QASample] | None = None
                      ) -> tuple[UnlearningMethod, TrainConfig]:
    """The built method and a copy of its training settings, as :func:`unlearn` resolves them
    (table, then ``hyperparameters`` and ``train_config``); refuses an empty forget set and a
    method that needs a retain set without one."""
    if not forget:
        raise ConfigError("the forget set is empty")
    if isinstance(method, UnlearningMethod):
        unlearning = method
        _, default_train = table_of(unlearning.name, hyperparameter_table) \
            if unlearning.name else ({}, None)
    else:
        hyper, default_train = table_of(method.lower(), hyperparameter_table)
        hyper.update(hyperparameters or {})
        unlearning = make_method(method, **hyper)
    config = replace(train_config or default_train or TrainConfig())
    if unlearning.uses_retain and not retain and getattr(unlearning, "alpha", 0):
        raise ConfigError(f"method '{unlearning.name}' uses a retain set; give one (or alpha=0)")
    return unlearning, config


def start_unlearning(lm: LoadedModel, unlearning: UnlearningMethod, in_place: bool = False
                     ) -> tuple[torch.nn.Module, LoadedModel, torch.nn.Module | None]:
    """(the network that will move, it wrapped as a model, the frozen reference or None): a copy
    of ``lm``'s network (``lm`` itself with ``in_place``), the method set up on it."""
    net = lm.model if in_place else copy.deepcopy(lm.model)
    reference = None
    if unlearning.needs_reference:
        reference = copy.deepcopy(lm.model)  # frozen original, copied before any step
        reference.eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    unlearning.setup(net, reference)
    work = prepare(net, lm.tokenizer, name=f"{lm.name}+{unlearning.name}")
    return net, work, reference


def train_method(lm: LoadedModel, net: torch.nn.Module, unlearning: UnlearningMethod,
                 forget: Sequence[QASample], retain: Sequence[QASample] | None,
                 config: TrainConfig, **train_options) -> TrainLog:
    """The shared loop (:func:`cud.unlearning.loop.train`) with ``unlearning``'s loss and
    parameters on ``net``; ``train_options`` go to it (``evaluate``, ``progress``,
    ``stop_after``, ``eval_steps``)."""
    enc_f = encode_samples(lm.tokenizer, forget, max_length=lm.adapter.max_positions)
    enc_r = encode_samples(lm.tokenizer, retain, max_length=lm.adapter.max_positions) \
        if retain and unlearning.uses_retain else None
    train_options.setdefault("task", unlearning.name)
    return train(net, unlearning.loss, enc_f, enc_r, config, pad_token_id=lm.pad_token_id,
                 parameters=unlearning.trainable_parameters(net), **train_options)


@dataclass
class Trained:
    """A method trained on a copy of a model (:func:`train_unlearning`): the method as set up,
    its training settings, the trained model, the loop's log and the trajectory's evaluations
    (the forget set's NLL before the first step, every ``eval_every`` steps and after the last)."""

    unlearning: UnlearningMethod
    config: TrainConfig
    work: LoadedModel
    log: TrainLog
    trajectory: list[pd.DataFrame]


def train_unlearning(lm: LoadedModel, forget: Sequence[QASample],
                     retain: Sequence[QASample] | None, unlearning: UnlearningMethod,
                     config: TrainConfig, *, batch_size: int = 16, in_place: bool = False,
                     progress: Progress | None = None, plan: TrainPlan | None = None,
                     trajectory_sink: Callable[[pd.DataFrame], None] | None = None,
                     task: str | None = None, trajectory: bool = True) -> Trained:
    """Train ``unlearning`` (built, not yet set up) on a copy of ``lm`` (``lm`` itself with
    ``in_place``) with ``config``, recording the trajectory; ``trajectory_sink`` receives each
    evaluation's rows as they are made (``trajectory`` False: none are made). The one training path of :func:`unlearn` and of the
    calibration's runs, so a calibration run can stand for the run at its rate."""
    net, work, reference = start_unlearning(lm, unlearning, in_place)
    rows: list[pd.DataFrame] = []

    def evaluate(step: int) -> None:
        nll = forget_set_nll(work, forget, batch_size)
        frame = pd.DataFrame({"step": step, "id": list(nll), "nll": list(nll.values())})
        frame["prob"] = np.exp(-frame["nll"])
        rows.append(frame)
        if trajectory_sink is not None:
            trajectory_sink(frame)

    log = train_method(lm, net, unlearning, forget, retain, config,
                       evaluate=evaluate if trajectory else None, progress=progress, plan=plan,
                       **({"task": task} if task else {}))
    del reference
    unlearning.reference = None
    return Trained(unlearning, config, work, log, rows)


def unlearn(lm: LoadedModel, forget: Sequence[QASample], retain: Sequence[QASample] | None = None,
            *, method: str | UnlearningMethod = "graddiff",
            hyperparameter_table: str = DEFAULT_TABLE,
            hyperparameters: dict | None = None, train_config: TrainConfig | None = None,
            eval_every: int | None = None, metrics: Sequence[str] = ALL_METRICS,
            forget_threshold: float = DEFAULT_FORGET_THRESHOLD, batch_size: int = 16,
            generation_budget: float = 2.0, eval_bf16: bool = False,
            in_place: bool = False, before: pd.DataFrame | None = None,
            evaluate_retain: bool = False, retain_before: pd.DataFrame | None = None,
            progress: Progress | None = None,
            trajectory_sink: Callable[[pd.DataFrame], None] | None = None,
            plan: TrainPlan | None = None, trained: Trained | None = None) -> UnlearningResult:
    """Unlearn ``forget`` from ``lm`` and return the unlearned model and per-sample outcomes.

    ``method``: a registry name (ga, graddiff, npo, simnpo, rmu, undial) or a built method.
    Hyperparameters and training settings come from the table ``hyperparameter_table``
    (:mod:`cud.unlearning.hyperparameters`: ``quick``, ``paper``, ...); ``hyperparameters`` and
    ``train_config`` override them. ``eval_every`` k: track every forget sample's NLL every k
    optimizer steps (a trajectory; ``steps_to_forget`` uses it, and without it only the start
    and the end are known). The original ``lm`` is left untouched
    unless ``in_place``. ``before`` may pass already computed outcomes of ``lm`` on ``forget``,
    ``retain_before`` (with ``evaluate_retain``) its nll/prob/exact_mem on ``retain``.
    ``trajectory_sink`` receives each evaluation's rows as they are made (to write as you go).
    ``eval_bf16``: the evaluations before and after in bf16 products
    (:func:`cud.unlearning.outcomes.evaluate_outcomes`). ``plan``: a strategy's changes to the
    loop (:mod:`cud.unlearning.strategies`; None: plain). ``trained``: the method already
    trained with these settings (a calibration's run at the chosen rate,
    :func:`train_unlearning`): only evaluated, its trajectory passed to ``trajectory_sink``.
    """
    unlearning, config = method_and_config(method, hyperparameter_table, hyperparameters,
                                           train_config, forget, retain)
    if eval_every is not None:
        config.eval_every = eval_every

    if before is None:
        before = evaluate_outcomes(lm, forget, metrics=metrics, batch_size=batch_size,
                                   generation_budget=generation_budget, bf16=eval_bf16)
    if not (evaluate_retain and retain):
        retain_before = None
    elif retain_before is None:
        retain_before = retain_outcomes(lm, retain, batch_size, bf16=eval_bf16)

    if trained is None:
        trained = train_unlearning(lm, forget, retain, unlearning, config,
                                   batch_size=batch_size, in_place=in_place, progress=progress,
                                   plan=plan, trajectory_sink=trajectory_sink)
    elif trajectory_sink is not None:
        for frame in trained.trajectory:
            trajectory_sink(frame)
    unlearning, config, work, log = trained.unlearning, trained.config, trained.work, trained.log
    rows = trained.trajectory

    after = evaluate_outcomes(work, forget, metrics=metrics, batch_size=batch_size,
                              generation_budget=generation_budget, bf16=eval_bf16)
    retain_after = retain_outcomes(work, retain, batch_size, bf16=eval_bf16) \
        if evaluate_retain and retain else None
    trajectory = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["step", "id", "nll", "prob"])
    stf = steps_to_forget(trajectory, forget_threshold)
    return UnlearningResult(
        model=work, method=unlearning, train_config=config, before=before, after=after,
        deltas=outcome_deltas(before, after), trajectory=trajectory, steps_to_forget=stf,
        log=log, retain_before=retain_before, retain_after=retain_after,
        settings={"method": unlearning.name, "table": hyperparameter_table,
                  "hyperparameters": unlearning.hyperparameters(), "train": config.to_dict(),
                  "forget_threshold": forget_threshold, "n_forget": len(forget),
                  "n_retain": len(retain or [])})


def spread(values: pd.Series) -> dict[str, float]:
    """Quartiles, mean and standard deviation of a per-sample quantity (e.g. the NLL increase)."""
    v = values.dropna().astype(float)
    if v.empty:
        return {k: math.nan for k in ("min", "q1", "median", "q3", "max", "mean", "std")}
    q = v.quantile([0, 0.25, 0.5, 0.75, 1.0]).to_numpy()
    return {"min": q[0], "q1": q[1], "median": q[2], "q3": q[3], "max": q[4],
            "mean": float(v.mean()), "std": float(v.std(ddof=0))}
