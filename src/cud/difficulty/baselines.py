"""Baseline difficulty metrics (METHOD §7): what CUD must beat, each computed *before* unlearning.

Per sample, keyed by id: pre-unlearning answer loss, answer probability, exact memorisation,
Min-K% probability, gradient norm, MRD, and a seeded random score (the random ranking).
None of them has a known direction with respect to unlearning difficulty; :data:`BASELINE_METRICS`
says what a high value means, and validation reads each against the ground truth.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from cud.data.encoding import Batch, batches, encode_samples
from cud.data.samples import QASample
from cud.errors import ConfigError
from cud.folders import folder_lock, replacing
from cud.limits import check_seed
from cud.models.answers import answer_logits, teacher_forced_outcomes
from cud.models.loading import LoadedModel
from cud.prices import record_price
from cud.progress import Progress
from cud.tables import save_table

#: baseline metric -> what a high value means
BASELINE_METRICS: dict[str, str] = {
    "loss": "high = answer poorly known before unlearning (mean answer NLL)",
    "prob": "high = answer well known (normalised answer probability)",
    "exact_mem": "high = answer memorised token by token (teacher-forced argmax)",
    "min_k_prob": "high = even the least likely answer tokens are likely (Min-K% Prob, "
                  "mean log-prob of the k% lowest)",
    "grad_norm": "high = the loss is steep at this sample (norm of the NLL gradient)",
    "mrd": "high = the log-likelihood is sensitive to weight noise (MRD, Feng et al. 2025; "
           "tracks the Hessian trace; capped at 2)",
    "random": "a seeded uniform random score (the random ranking)",
}


@dataclass(frozen=True)
class BaselineSettings:
    """Which baseline metrics are computed and how (`cud baselines`, ``[baselines]`` of
    `cud run`). ``mrd_k``: MRD's number of weight perturbations (the MRD paper uses 100; 20
    keeps the default run affordable on a CPU, the ``paper`` preset sets 100). ``enabled``:
    whether `cud run` computes them at all."""

    enabled: bool = True
    metrics: tuple[str, ...] = tuple(BASELINE_METRICS)
    min_k: float = 0.2
    mrd_k: int = 20
    mrd_sigma: float = 1e-5
    mrd_tokens: str = "answer"
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in BASELINE_METRICS]
        if unknown:
            raise ConfigError(f"unknown baseline metric(s) {', '.join(unknown)} "
                              f"(choose from {', '.join(BASELINE_METRICS)})")
        if not 0 < self.min_k <= 1:
            raise ConfigError(f"min-k fraction must be in (0, 1], got {self.min_k}")
        if self.mrd_k < 1:
            raise ConfigError(f"MRD needs K >= 1 draws, got {self.mrd_k}")
        if not self.mrd_sigma >= 0:
            raise ConfigError(f"MRD needs sigma >= 0, got {self.mrd_sigma}")
        check_seed(self.seed)
        if self.mrd_tokens not in ("answer", "all"):
            raise ConfigError(f"MRD tokens must be 'answer' or 'all', got '{self.mrd_tokens}'")

    def to_dict(self) -> dict:
        return asdict(self)


def _encoded(lm: LoadedModel, samples: Sequence[QASample]):
    return encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)


@torch.no_grad()
def min_k_prob(lm: LoadedModel, samples: Sequence[QASample], *, k: float = 0.2,
               batch_size: int = 16) -> pd.Series:
    """Min-K% Prob (Shi et al. 2024): mean log-probability of the ceil(k·|y|) least likely answer
    tokens."""
    if not 0 < k <= 1:
        raise ConfigError(f"min-k fraction must be in (0, 1], got {k}")
    out: dict[str, float] = {}
    for batch in batches(_encoded(lm, samples), batch_size, lm.pad_token_id):
        al = answer_logits(lm.model, batch.to(lm.device))
        logp = al.token_logprobs()
        for i, sid in enumerate(batch.ids):
            values = torch.sort(logp[al.rows == i]).values
            n = max(1, math.ceil(k * len(values)))
            out[sid] = float(values[:n].mean())
    return pd.Series([out[s.id] for s in samples], index=pd.Index([s.id for s in samples],
                                                                  name="id"), name="min_k_prob")


def gradient_norms(lm: LoadedModel, samples: Sequence[QASample], *,
                   progress: Progress | None = None) -> pd.Series:
    """‖∇_θ NLL(sample)‖₂ over every trainable parameter, one sample at a time (exact per-sample
    gradients; a batch would sum them)."""
    model = lm.model
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    encoded = _encoded(lm, samples)
    out = []
    try:
        for n, e in enumerate(encoded):
            batch = next(iter(batches([e], 1, lm.pad_token_id))).to(lm.device)
            model.zero_grad(set_to_none=True)
            answer_logits(model, batch).nll().sum().backward()
            sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in params
                     if p.grad is not None)
            out.append(math.sqrt(sq))
            if progress:
                progress("grad_norm", n + 1, len(encoded), "")
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return pd.Series(out, index=pd.Index([s.id for s in samples], name="id"), name="grad_norm")


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) float64 log p(target) from (N, V) logits, exact near log p = 0.

    MRD divides by the clean log-probability, and a memorised token's is exactly 0 in float32
    (and in a float64 log-softmax once the logit gap passes about 37 + ln V), which made MRD 0/0
    for a quarter of TOFU's fine-tuned answers. Where the target is the top logit,
    log p = -log1p(sum_j!=t exp(x_j - x_t)) keeps it nonzero until every other logit is about
    745 below the target's; elsewhere p <= 1/2 and a float64 log-softmax is exact enough."""
    x = logits.double()
    target = x.gather(-1, targets[:, None])
    rest = torch.exp((x - target).clamp(max=0.0))
    rest.scatter_(-1, targets[:, None], 0.0)
    near_one = -torch.log1p(rest.sum(-1))
    usual = x.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    top = x.argmax(-1) == targets
    return torch.where(top, near_one, usual)


def _token_logprobs(model, batch: Batch, tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float64 log p(x_t | x_<t) and (N,) batch row of each scored token. ``tokens``:
    ``answer`` (answer tokens) or ``all`` (every real token after the first)."""
    if tokens == "answer":
        al = answer_logits(model, batch)
        return _target_logprobs(al.logits, al.targets), al.rows
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                   use_cache=False).logits[:, :-1]
    keep = batch.attention_mask[:, 1:]
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    return _target_logprobs(logits[keep], batch.input_ids[:, 1:][keep]), rows


#: bumped when MRD's arithmetic changes, so a checkpoint or cached value of the old one is not
#: resumed into the new (2: float64 log-probabilities exact near 0, no 0/0)
MRD_VERSION = 2


def _mrd_key(lm: LoadedModel, samples: Sequence[QASample], sigma: float, k: int, seed: int,
             tokens: str, batch_size: int) -> str:
    h = hashlib.sha256(json.dumps([MRD_VERSION, lm.name, sigma, k, seed, tokens,
                                   batch_size]).encode())
    for s in samples:
        h.update(s.identity().encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def mrd(lm: LoadedModel, samples: Sequence[QASample], *, sigma: float = 1e-5, k: int = 100,
        seed: int = 0, tokens: str = "answer", batch_size: int = 16,
        checkpoint: str | Path | None = None, progress: Progress | None = None) -> pd.Series:
    """Memory Removal Difficulty (Feng et al. 2025), per sample:

        MRD = min(|(1/K) Σ_k Σ_t (P_t(θ) - P_t(θ + ε_k)) / P_t(θ)|, 2),  ε_k ~ N(0, σ²I),

    P_t the log-probability of token t (``tokens``: the answer's, default, or all real tokens).
    Batched over perturbations: each perturbed model θ + ε_k is made once, in place, and scores
    every sample in batches, so the cost is K forward passes over the set plus drawing the noise
    (not one model copy per sample). The noise of draw k is seeded by (seed, k), so a run resumed
    from ``checkpoint`` (a ``.npz`` written after every draw) equals an uninterrupted one.
    The weights are restored exactly afterwards. Needs float32 weights: in bf16/fp16 a perturbation
    of σ = 1e-5 is below the weights' resolution.
    """
    if k < 1:
        raise ConfigError(f"MRD needs K >= 1 draws, got {k}")
    if sigma < 0:
        raise ConfigError(f"MRD needs sigma >= 0, got {sigma}")
    if tokens not in ("answer", "all"):
        raise ConfigError(f"MRD tokens must be 'answer' or 'all', got '{tokens}'")
    if lm.dtype in (torch.bfloat16, torch.float16) and 0 < sigma < 1e-2:
        raise ConfigError(f"MRD with sigma={sigma} needs float32 weights (the model is "
                          f"{str(lm.dtype).replace('torch.', '')}); load it with dtype float32")
    model = lm.model
    was_training = model.training
    model.eval()
    batch_list = [b.to(lm.device) for b in batches(_encoded(lm, samples), batch_size,
                                                   lm.pad_token_id)]
    clean = [_token_logprobs(model, b, tokens) for b in batch_list]
    acc = [torch.zeros(len(b), dtype=torch.float64, device=lm.device) for b in batch_list]
    start = 0
    key = _mrd_key(lm, samples, sigma, k, seed, tokens, batch_size)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        saved = np.load(ckpt)
        if str(saved["key"]) == key:
            start = int(saved["done"])
            acc = [torch.from_numpy(saved[f"acc{i}"]).to(lm.device) for i in range(len(acc))]
    params = [p for p in model.parameters()]
    originals = [p.detach().clone() for p in params] if start < k and sigma > 0 else []
    try:
        for draw in range(start, k):
            if sigma > 0:
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + draw)
                for p, p0 in zip(params, originals):
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                    p.copy_(p0 + sigma * noise.to(p.device, p.dtype))
            for b, (p_clean, rows), a in zip(batch_list, clean, acc):
                p_pert, _ = _token_logprobs(model, b, tokens)
                # a token certain even in float64 (every other logit ~745 below) cannot move
                rel = torch.where(p_clean < 0, (p_clean - p_pert) / p_clean.clamp(max=-1e-300),
                                  torch.zeros_like(p_clean))
                a.index_add_(0, rows, rel)
            if ckpt is not None:
                _save_checkpoint(ckpt, key, draw + 1, acc)
            if progress:
                progress("mrd", draw + 1, k, "")
    finally:
        for p, p0 in zip(params, originals):
            p.copy_(p0)
        model.train(was_training)
    values: dict[str, float] = {}
    for b, a in zip(batch_list, acc):
        for sid, v in zip(b.ids, (a / k).abs().clamp(max=2.0).tolist()):
            values[sid] = v
    return pd.Series([values[s.id] for s in samples],
                     index=pd.Index([s.id for s in samples], name="id"), name="mrd")


def _save_checkpoint(path: Path, key: str, done: int, acc: list[torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, key=key, done=done, **{f"acc{i}": a.cpu().numpy()
                                             for i, a in enumerate(acc)})


def random_scores(samples: Sequence[QASample], seed: int = 0) -> pd.Series:
    rng = np.random.default_rng(seed)
    return pd.Series(rng.random(len(samples)), index=pd.Index([s.id for s in samples], name="id"),
                     name="random")


def baseline_metrics(lm: LoadedModel, samples: Sequence[QASample],
                     settings: BaselineSettings = BaselineSettings(), *,
                     work_dir: str | Path | None = None, progress: Progress | None = None
                     ) -> pd.DataFrame:
    """Every baseline difficulty metric of ``settings.metrics`` for ``samples`` under ``lm``
    (before unlearning), one column each (see :data:`BASELINE_METRICS`), index ``id``.

    With ``work_dir``, each finished metric is kept there (keyed by a hash of the model's
    fingerprint, the samples and the metric's settings) and MRD checkpoints after every draw,
    so a killed run resumes.
    """
    from cud.models.fingerprint import model_fingerprint
    b = settings
    work = Path(work_dir) if work_dir is not None else None
    ids = pd.Index([s.id for s in samples], name="id")
    table = pd.DataFrame(index=ids)
    fingerprint = model_fingerprint(lm) if work is not None else ""

    seconds: dict[str, float] = {}   # per computation: seconds per sample, where it was made

    def timed(name: str, compute: Callable[[], pd.Series | pd.DataFrame]):
        start = time.perf_counter()
        value = compute()
        seconds[name] = (time.perf_counter() - start) / max(1, len(samples))
        return value

    def cached(name: str, key: list, compute: Callable[[], pd.Series | pd.DataFrame]):
        if work is None:
            return timed(name, compute)
        h = hashlib.sha256(json.dumps([fingerprint, name, key]).encode())
        for s in samples:
            h.update(s.identity().encode())
        path = work / f"baseline.{name}.{h.hexdigest()[:16]}.parquet"
        price = path.with_suffix(".seconds.json")  # the price, kept beside the cached value
        if path.is_file():
            try:
                seconds[name] = float(json.loads(price.read_text())["seconds_per_sample"])
            except (OSError, ValueError, KeyError, TypeError):
                seconds[name] = math.nan   # cached before prices were kept
            return pd.read_parquet(path)
        value = timed(name, compute)
        frame = value.to_frame() if isinstance(value, pd.Series) else value
        work.mkdir(parents=True, exist_ok=True)
        with replacing(price) as tmp:   # the price first: the value file marks it done
            tmp.write_text(json.dumps({"seconds_per_sample": seconds[name]}) + "\n")
        with replacing(path) as tmp:
            frame.to_parquet(tmp)
        return frame

    tf_wanted = [m for m in ("loss", "prob", "exact_mem") if m in b.metrics]
    if tf_wanted:
        tf = cached("teacher_forced", [b.batch_size], lambda: teacher_forced_outcomes(
            lm, samples, batch_size=b.batch_size, progress=progress, task="loss"))
        tf = tf.rename(columns={"nll": "loss"})
        for m in tf_wanted:
            table[m] = tf[m].reindex(ids)
    if "min_k_prob" in b.metrics:
        table["min_k_prob"] = _col(cached("min_k_prob", [b.min_k], lambda: min_k_prob(
            lm, samples, k=b.min_k, batch_size=b.batch_size)), ids)
    if "grad_norm" in b.metrics:
        table["grad_norm"] = _col(cached("grad_norm", [], lambda: gradient_norms(
            lm, samples, progress=progress)), ids)
    if "mrd" in b.metrics:
        ckpt = work / "mrd.checkpoint.npz" if work is not None else None
        key = [MRD_VERSION, b.mrd_sigma, b.mrd_k, b.mrd_tokens, b.seed]
        table["mrd"] = _col(cached("mrd", key,
                                   lambda: mrd(lm, samples, sigma=b.mrd_sigma, k=b.mrd_k,
                                               seed=b.seed, tokens=b.mrd_tokens,
                                               batch_size=b.batch_size, checkpoint=ckpt,
                                               progress=progress)), ids)
    if "random" in b.metrics:
        table["random"] = random_scores(samples, b.seed)
        seconds["random"] = 0.0
    # each metric's price: the computation that made it (loss, prob and exact memorisation
    # share one teacher-forced pass, so each carries that pass's price)
    made_by = {"loss": "teacher_forced", "prob": "teacher_forced", "exact_mem": "teacher_forced"}
    table.attrs["seconds_per_sample"] = {m: seconds.get(made_by.get(m, m), math.nan)
                                         for m in table.columns}
    return table


def baselines_to_folder(lm: LoadedModel, samples: Sequence[QASample], out: str | Path,
                        settings: BaselineSettings = BaselineSettings(), *,
                        progress: Progress | None = None) -> pd.DataFrame:
    """The baselines stage (`cud baselines`, and `cud run`'s): :func:`baseline_metrics` with
    its work kept in ``out/.work`` (resumable), the table written to ``out/baselines``; one
    process at a time (:func:`~cud.folders.folder_lock`)."""
    with folder_lock(out):
        return _baselines_to_folder(lm, samples, out, settings, progress)


def _baselines_to_folder(lm, samples, out, settings, progress) -> pd.DataFrame:
    table = baseline_metrics(lm, samples, settings, work_dir=Path(out) / ".work",
                             progress=progress)
    save_table(table, Path(out) / "baselines")
    what = {"loss": "one teacher-forced pass (shared by loss, prob, exact_mem)",
            "prob": "one teacher-forced pass (shared by loss, prob, exact_mem)",
            "exact_mem": "one teacher-forced pass (shared by loss, prob, exact_mem)",
            "min_k_prob": "one teacher-forced pass", "grad_norm": "one backward pass a sample",
            "mrd": f"{settings.mrd_k} perturbed forward passes", "random": "nothing"}
    for metric, per_sample in table.attrs.get("seconds_per_sample", {}).items():
        if math.isfinite(per_sample):
            record_price(out, metric, per_sample * len(samples), len(samples),
                         what=what.get(metric, ""))
    return table


def _col(value: pd.Series | pd.DataFrame, ids: pd.Index) -> pd.Series:
    series = value.iloc[:, 0] if isinstance(value, pd.DataFrame) else value
    return series.reindex(ids)
