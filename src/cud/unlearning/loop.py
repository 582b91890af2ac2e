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
from typing import Callable, Collection, Sequence

import torch

from cud.data.encoding import Batch, EncodedSample, collate
from cud.errors import ConfigError
from cud.limits import check_amount, check_count, check_rate, check_seed
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
          stop_after: int | None = None, eval_steps: Collection[int] = ()) -> TrainLog:
    """Minimise ``objective`` over micro-batches of ``forget`` (with ``retain`` alongside).

    Only ``parameters`` move (default: every parameter); the others are frozen for the run and
    unfrozen after. ``progress`` (``task``) is called after each optimizer step with the loss.
    ``stop_after`` k: stop after k optimizer steps of the full run, whose schedule (warm-up,
    decay over all its steps) is kept, so the first k steps are exactly those of the full run
    (a pilot); ``evaluate`` is then called at k instead of the last step. ``eval_steps``: more
    steps after which ``evaluate`` is called. Leaves the model in eval mode.
    """
    config.validate()
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
    forget_walk = _Cycle(forget, random.Random(rng.random()), config.group_by_length)
    retain_walk = _Cycle(retain, random.Random(rng.random()), config.group_by_length) \
        if retain else None
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
            logs_sum: dict[str, float] = {}
            loss_sum = 0.0
            for _ in range(config.grad_accum):
                f_batch = collate(forget_walk.take(min(config.batch_size, len(forget))),
                                  pad_token_id).to(device)
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
            if config.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            else:
                grad_norm = float("nan")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1, "lr": lr, "loss": loss_sum, "grad_norm": grad_norm,
                   **logs_sum}
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
