"""The one training loop every method and fine-tuning share.

AdamW, linear warm-up then a linear / cosine / constant schedule, gradient accumulation, a length
in epochs (passes over the forget set) or optimizer steps, a seed, whatever device the model is on,
bf16 autocast on GPU. A retain micro-batch of the same size is drawn alongside each forget
micro-batch (a seeded walk through shuffled retain samples), as open-unlearning's forget/retain
dataset does. ``evaluate`` is called before the first step, every ``eval_every`` optimizer steps
and after the last, in eval mode, with no gradient.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Mapping, Sequence

import torch

from cud.data.encoding import Batch, EncodedSample, batches, collate
from cud.errors import ConfigError
from cud.limits import check_amount, check_count, check_rate, check_seed
from cud.models.answers import answer_logits
from cud.progress import Progress

#: the most optimizer steps, epochs, samples per micro-batch and micro-batches per step a run
#: may ask for (far above any real run; a larger value is a typo that would run for days)
MAX_STEPS = 1_000_000
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536

#: (model, forget micro-batch, retain micro-batch or None) -> (loss to minimise, numbers to log)
Objective = Callable[[torch.nn.Module, Batch, "Batch | None"], "tuple[torch.Tensor, dict]"]


@dataclass
class TrainConfig:
    """Optimisation settings. ``epochs`` counts passes over the forget (taught) set; when
    ``max_steps`` is set it wins. One optimizer step = ``grad_accum`` micro-batches of
    ``batch_size`` samples (effective batch ``batch_size * grad_accum``)."""

    lr: float = 1e-5
    epochs: float = 10
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.1          # a fraction (< 1) of all steps, or a number of steps (>= 1)
    schedule: str = "linear"     # linear | cosine | constant (after warm-up)
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: bool | None = None     # autocast to bf16; None: on GPU yes, on CPU no
    eval_every: int | None = None  # evaluate every k optimizer steps (None: before and after only)
    #: micro-batches of samples of similar length (less padding): each pass over the data is
    #: shuffled, cut into windows of 16 micro-batches, each window sorted by length
    group_by_length: bool = False

    def validate(self) -> None:
        """Refuse values out of range (maxima: :data:`MAX_STEPS`, :data:`MAX_EPOCHS`,
        :data:`MAX_BATCH`; seeds: :data:`cud.limits.MAX_SEED`)."""
        check_rate(self.lr, "lr")
        check_count(self.batch_size, "batch_size", MAX_BATCH)
        check_count(self.grad_accum, "grad_accum", MAX_BATCH)
        if self.max_steps is None:
            check_amount(self.epochs, "epochs", MAX_EPOCHS)
        else:
            check_count(self.max_steps, "max_steps", MAX_STEPS)
        check_seed(self.seed)
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"unknown schedule '{self.schedule}' (linear, cosine, constant)")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError("eval_every must be at least 1")

    def total_steps(self, n_samples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        micro_per_epoch = math.ceil(n_samples / self.batch_size)
        return max(1, math.ceil(micro_per_epoch * self.epochs / self.grad_accum))

    def warmup_steps(self, total: int) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * total))

    def to_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


@dataclass
class TrainLog:
    """What a training run did: one row per optimizer step, and the wall time."""

    steps: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    total_steps: int = 0
    #: the last optimizer step taken (``total_steps`` unless stopped early by ``stop_after``)
    stopped_at: int = 0


@dataclass
class TrainPlan:
    """How a strategy (:mod:`cud.unlearning.strategies`) changes the loop, in plain data. Every
    field None (the default): the plain loop, step for step the loop without a plan.

    ``weights``: a loss weight per forget-sample id, put on each forget micro-batch
    (:attr:`cud.data.encoding.Batch.weights`) for the method's weighted mean.
    ``stages``: ordered groups of forget-sample ids trained one after another; the run's steps
    are split between them in proportion to their sizes (:func:`stage_bounds`), one optimizer
    and one schedule over all of them.
    ``focus_every`` k with ``focus_threshold`` p: before step 0 and every k steps, each forget
    sample's teacher-forced normalised answer probability is read again and only those at or
    above p are trained on until the next reading; when none is left the run stops there.
    ``masks``: parameter name -> bool tensor of its shape, True on the entries that may move;
    a parameter not named does not move. The update is masked (gradient zeroed before clipping,
    the frozen entries written back after each optimizer step), so weight decay and Adam's
    moments never move a frozen entry."""

    weights: Mapping[str, float] | None = None
    stages: Sequence[Sequence[str]] | None = None
    focus_every: int | None = None
    focus_threshold: float | None = None
    masks: Mapping[str, torch.Tensor] | None = None

    def validate(self) -> None:
        if self.stages is not None and self.focus_every is not None:
            raise ConfigError("a training plan has either stages or focus, not both")
        if (self.focus_every is None) != (self.focus_threshold is None):
            raise ConfigError("focus needs both focus_every and focus_threshold")
        if self.focus_every is not None and self.focus_every < 1:
            raise ConfigError(f"focus_every must be at least 1, got {self.focus_every}")
        if self.stages is not None and not any(self.stages):
            raise ConfigError("a training plan's stages are all empty")


def stage_bounds(total: int, sizes: Sequence[int]) -> list[int]:
    """Cumulative last step (exclusive) of each stage: ``total`` steps split in proportion to
    ``sizes``, rounded (e.g. 10 steps over three equal tertiles: 3, 7, 10)."""
    n = sum(sizes)
    bounds, acc = [], 0
    for size in sizes:
        acc += size
        bounds.append(int(round(total * acc / n)))
    return bounds


def answer_probabilities(model: torch.nn.Module, encoded: Sequence[EncodedSample],
                         pad_token_id: int, batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced normalised answer probability exp(-mean answer NLL) per sample id (the
    ``prob`` of the outcomes), no gradient, in eval mode (the caller restores train mode)."""
    device = next(model.parameters()).device
    model.eval()
    out = {}
    with torch.no_grad():
        for batch in batches(encoded, batch_size, pad_token_id):
            nll = answer_logits(model, batch.to(device)).nll()
            out.update(zip(batch.ids, torch.exp(-nll.float()).tolist()))
    return out


class _Cycle:
    """Endless seeded walk through shuffled items, reshuffled at each pass. With
    ``group_by_length``, each pass is shuffled, cut into windows of 16 micro-batches of ``n``
    and sorted by length within a window (the micro-batches then taken in a shuffled order):
    batches of similar lengths, so little padding, at the same randomness per pass."""

    WINDOW = 16

    def __init__(self, items: Sequence, rng: random.Random, group_by_length: bool = False):
        self.items, self.rng, self.order = list(items), rng, []
        self.group = group_by_length

    def _refill(self, n: int) -> None:
        order = list(range(len(self.items)))
        self.rng.shuffle(order)
        if self.group:
            size = n * self.WINDOW
            grouped = []
            for start in range(0, len(order), size):
                window = sorted(order[start:start + size], key=lambda i: len(self.items[i]))
                grouped += [window[k:k + n] for k in range(0, len(window), n)]
            self.rng.shuffle(grouped)
            order = [i for chunk in grouped for i in chunk][::-1]  # popped from the end
        self.order = order

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not self.order:
                self._refill(n)
            out.append(self.items[self.order.pop()])
        return out


def train(model: torch.nn.Module, objective: Objective, forget: Sequence[EncodedSample],
          retain: Sequence[EncodedSample] | None, config: TrainConfig, *, pad_token_id: int,
          parameters: Sequence[torch.nn.Parameter] | None = None,
          evaluate: Callable[[int], None] | None = None,
          progress: Progress | None = None, task: str = "training",
          stop_after: int | None = None, eval_steps: Collection[int] = (),
          plan: TrainPlan | None = None) -> TrainLog:
    """Minimise ``objective`` over micro-batches of ``forget`` (with ``retain`` alongside).

    Only ``parameters`` move (default: every parameter); the others are frozen for the run and
    unfrozen after. ``progress`` (``task``) is called after each optimizer step with the loss.
    ``stop_after`` k: stop after k optimizer steps of the full run, whose schedule (warm-up,
    decay over all its steps) is kept, so the first k steps are exactly those of the full run
    (a pilot); ``evaluate`` is then called at k instead of the last step. ``eval_steps``: more
    steps after which ``evaluate`` is called. ``plan``: a strategy's changes (:class:`TrainPlan`;
    None: plain). Leaves the model in eval mode.
    """
    config.validate()
    plan = plan or TrainPlan()
    plan.validate()
    if not forget:
        raise ConfigError("nothing to train on: the forget (taught) set is empty")
    device = next(model.parameters()).device
    total = config.total_steps(len(forget))
    warmup = config.warmup_steps(total)
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"stop_after must be at least 1 step, got {stop_after}")
    last = total if stop_after is None else min(total, stop_after)
    extra = set(eval_steps)
    use_bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"

    params = list(parameters) if parameters is not None else list(model.parameters())
    masks: dict[torch.nn.Parameter, torch.Tensor] = {}
    if plan.masks is not None:
        named = dict(model.named_parameters())
        unknown = sorted(set(plan.masks) - set(named))
        if unknown:
            raise ConfigError(f"update masks name parameters the model lacks: "
                              f"{', '.join(unknown[:3])}")
        for name, mask in plan.masks.items():
            if tuple(mask.shape) != tuple(named[name].shape):
                raise ConfigError(f"update mask of {name}: shape {tuple(mask.shape)}, the "
                                  f"parameter's {tuple(named[name].shape)}")
        wanted = {id(named[n]): m for n, m in plan.masks.items() if bool(m.any())}
        params = [p for p in params if id(p) in wanted]
        if not params:
            raise ConfigError("the update masks leave no parameter of the method free to move")
        masks = {p: wanted[id(p)].to(p.device, torch.bool) for p in params
                 if not bool(wanted[id(p)].all())}
    frozen_values = {p: p.detach().clone() for p in masks}
    moving = {id(p) for p in params}
    frozen_state = {}
    for p in model.parameters():
        frozen_state[p] = p.requires_grad
        p.requires_grad_(id(p) in moving)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config.schedule))

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    forget_rng = random.Random(rng.random())
    forget_walk = _Cycle(forget, forget_rng, config.group_by_length)
    retain_walk = _Cycle(retain, random.Random(rng.random()), config.group_by_length) \
        if retain else None
    by_id = {e.id: e for e in forget}
    stage_walks, bounds = [], []
    if plan.stages is not None:
        staged = [i for group in plan.stages for i in group]
        if sorted(staged) != sorted(by_id):
            raise ConfigError(f"the stages hold {len(staged)} ids, the forget set "
                              f"{len(by_id)} samples: each forget sample must be in one stage")
        groups = [[by_id[i] for i in group] for group in plan.stages if group]
        bounds = stage_bounds(total, [len(g) for g in groups])
        stage_walks = [_Cycle(g, forget_rng, config.group_by_length) for g in groups]
    weights = None
    if plan.weights is not None:
        missing = [i for i in by_id if i not in plan.weights]
        if missing:
            raise ConfigError(f"sample weights miss {len(missing)} forget sample(s), e.g. "
                              f"{missing[0]}")
        weights = plan.weights
    active = list(forget)
    log = TrainLog(total_steps=total)
    start = time.perf_counter()

    def run_eval(step: int) -> None:
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                evaluate(step)

    try:
        run_eval(0)
        model.train()
        for step in range(last):
            if plan.focus_every is not None and step % plan.focus_every == 0:
                probs = answer_probabilities(model, forget, pad_token_id, config.batch_size)
                still = [e for e in forget if probs[e.id] >= plan.focus_threshold]
                model.train()
                if not still:  # every sample forgotten: the rest of the budget is not spent
                    last = step
                    break
                if [e.id for e in still] != [e.id for e in active]:
                    active = still
                    forget_walk = _Cycle(active, forget_rng, config.group_by_length)
            walk, pool = forget_walk, len(active)
            if stage_walks:
                stage = next(g for g, end in enumerate(bounds) if step < end)
                walk, pool = stage_walks[stage], len(stage_walks[stage].items)
            logs_sum: dict[str, float] = {}
            loss_sum = 0.0
            for _ in range(config.grad_accum):
                f_batch = collate(walk.take(min(config.batch_size, pool)), pad_token_id)
                if weights is not None:
                    f_batch.weights = torch.tensor([weights[i] for i in f_batch.ids],
                                                   dtype=torch.float32)
                f_batch = f_batch.to(device)
                r_batch = collate(retain_walk.take(config.batch_size), pad_token_id).to(device) \
                    if retain_walk else None
                # no weight cache: inside an outer autocast block it would outlive the step
                # and feed every later step the weights of the first (cud.models.precision)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16,
                                    cache_enabled=False):
                    loss, logs = objective(model, f_batch, r_batch)
                (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach()) / config.grad_accum
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + v / config.grad_accum
            for p, mask in masks.items():
                if p.grad is not None:
                    p.grad.mul_(mask)
            if config.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            else:
                grad_norm = float("nan")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            with torch.no_grad():  # the update masked: weight decay and momenta included
                for p, mask in masks.items():
                    p.copy_(torch.where(mask, p, frozen_values[p]))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1, "lr": lr, "loss": loss_sum, "grad_norm": grad_norm,
                   **logs_sum}
            if plan.focus_every is not None:
                row["focus_active"] = len(active)
            if stage_walks:
                row["stage"] = stage
            log.steps.append(row)
            if progress is not None:
                progress(task, step + 1, total, f"loss {loss_sum:.3f}")
            due = (config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 in extra
            if due and step + 1 < last:
                run_eval(step + 1)
                model.train()
        log.stopped_at = last
        run_eval(last)
    finally:
        model.eval()
        for p, flag in frozen_state.items():
            p.requires_grad_(flag)
        log.seconds = time.perf_counter() - start
    return log
