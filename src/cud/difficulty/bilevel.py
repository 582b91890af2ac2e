"""The paper's bi-level anchor selection (METHOD §4), in a first-order form (ours).

The paper chooses a binary mask w over the forget set that maximises (easy) or minimises (hard)

    F(w) = Σ_i w_i L(z_i; θ_u(w)) + λ‖w‖²,

θ_u(w) the model after unlearning the chosen subset with a GradDiff-style objective. Solving it
exactly needs an unlearning run per candidate subset. We replace θ_u(w) by one gradient step of
size η on the GradDiff loss of the subset (mean over the k chosen samples, retain weight α):

    θ_u(w) ≈ θ + (η/k) Σ_j w_j g_j - η α g_R,       g_j = ∇L(z_j; θ), g_R the retain mean,

and a first-order expansion of each loss, L_i(θ_u) ≈ L_i + g_i·(θ_u - θ), turns F into a quadratic
in w:  F(w) ≈ wᵀL + (η/k) wᵀGw - ηα wᵀr,   G_ij = g_i·g_j,  r_i = g_i·g_R.
With |w| fixed at k the penalty λ‖w‖² = λk is a constant, so it does not change the choice and is
left out. The quadratic is optimised over subsets of size k (:func:`select_subset`: exactly for
small candidate sets, else by a local search). Gradients are taken over a parameter subset
(default: the MLPs of the last decoder layer), which keeps the n x P gradient matrix small.

No unlearning run and no post-unlearning outcome is used, so only the chosen anchors are held
back from validation.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from cud.data.encoding import batches, encode_samples
from cud.data.samples import QASample
from cud.difficulty.anchors import AnchorSet, anchor_pool
from cud.errors import ConfigError
from cud.models.loading import LoadedModel
from cud.unlearning.hyperparameters import DEFAULT_TABLE, hyperparameters
from cud.models.answers import answer_logits


def subset_objective(subset: Sequence[int], loss: np.ndarray, gram: np.ndarray,
                     retain: np.ndarray, eta: float, alpha: float) -> float:
    """F(w) of the first-order model for the subset ``subset`` (indices)."""
    s = np.asarray(subset, dtype=int)
    k = max(1, len(s))
    return float(loss[s].sum() + eta / k * gram[np.ix_(s, s)].sum() - eta * alpha * retain[s].sum())


@dataclass
class SubsetChoice:
    indices: list[int]
    objective: float
    swaps: int


#: subsets up to this many are enumerated exactly; beyond it, local search
EXHAUSTIVE_LIMIT = 200_000


def select_subset(loss: np.ndarray, gram: np.ndarray, k: int, *, maximise: bool,
                  retain: np.ndarray | None = None, eta: float = 1.0, alpha: float = 0.0,
                  exhaustive_limit: int = EXHAUSTIVE_LIMIT, restarts: int = 8, seed: int = 0,
                  max_swaps: int = 10_000) -> SubsetChoice:
    """The k indices that maximise (or minimise) :func:`subset_objective`.

    Exact (every subset scored) when there are at most ``exhaustive_limit`` subsets; otherwise
    a local search: greedy additions, then single swaps in/out while one improves, repeated
    from ``restarts`` seeded random starts, the best kept (a swap-optimal subset)."""
    n = len(loss)
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and the number of candidates ({n}), got {k}")
    loss = np.asarray(loss, dtype=float)
    retain = np.zeros(n) if retain is None else np.asarray(retain, dtype=float)
    sign = 1.0 if maximise else -1.0
    if math.comb(n, k) <= exhaustive_limit:
        combos = np.array(list(itertools.combinations(range(n), k)), dtype=int)
        values = (loss[combos].sum(1) + eta / k * gram[combos[:, :, None], combos[:, None, :]]
                  .sum((1, 2)) - eta * alpha * retain[combos].sum(1))
        best = int(np.argmax(sign * values))
        return SubsetChoice(combos[best].tolist(), float(values[best]), 0)

    def f(subset):
        return sign * subset_objective(subset, loss, gram, retain, eta, alpha)

    def climb(chosen: list[int]) -> tuple[list[int], float, int]:
        value, swaps, improved = f(chosen), 0, True
        while improved and swaps < max_swaps:
            improved = False
            for a, b in itertools.product(range(k), range(n)):
                if b in chosen:
                    continue
                trial = chosen[:a] + [b] + chosen[a + 1:]
                if (v := f(trial)) > value + 1e-12:
                    chosen, value, improved, swaps = trial, v, True, swaps + 1
                    break
        return chosen, value, swaps

    greedy: list[int] = []
    for _ in range(k):
        rest = [i for i in range(n) if i not in greedy]
        greedy.append(max(rest, key=lambda i: (f(greedy + [i]), -i)))
    rng = np.random.default_rng(seed)
    starts = [greedy] + [rng.choice(n, k, replace=False).tolist() for _ in range(restarts)]
    results = [climb(list(s)) for s in starts]
    chosen, value, _ = max(results, key=lambda r: r[1])
    return SubsetChoice(sorted(chosen), sign * value, sum(r[2] for r in results))


def default_parameters(model: torch.nn.Module, layers: int = 1) -> list[torch.nn.Parameter]:
    """The MLP parameters of the last ``layers`` decoder layers (all parameters when the model's
    MLPs cannot be found by name)."""
    from cud.unlearning.methods.rmu import mlp_modules
    mlps = mlp_modules(model)
    if not mlps:
        return [p for p in model.parameters()]
    last = sorted(mlps)[-layers:]
    return [p for i in last for p in mlps[i].parameters()]


def per_sample_gradients(lm: LoadedModel, samples: Sequence[QASample],
                         parameters: Sequence[torch.nn.Parameter]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """((n,) answer NLL, (n, P) gradient of each sample's NLL over ``parameters``), one sample
    at a time (a batch would sum the gradients)."""
    model = lm.model
    was_training = model.training
    model.eval()
    encoded = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    losses, grads = [], []
    try:
        for e in encoded:
            batch = batches([e], 1, lm.pad_token_id)[0].to(lm.device)
            nll = answer_logits(model, batch).nll()[0]
            g = torch.autograd.grad(nll, list(parameters), allow_unused=True)
            grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                    .float().cpu() for x, p in zip(g, parameters)]))
            losses.append(float(nll.detach()))
    finally:
        model.train(was_training)
    return torch.tensor(losses), torch.stack(grads)


def bilevel_anchors(lm: LoadedModel, forget: Sequence[QASample], k: int, *,
                    retain: Sequence[QASample] = (), method: str = "graddiff",
                    hyperparameter_table: str = DEFAULT_TABLE, eta: float | None = None,
                    alpha: float | None = None, pool_fraction: float = 1.0, seed: int = 0,
                    layers: int = 1, progress: Callable[[int, int], None] | None = None
                    ) -> AnchorSet:
    """Easy and hard anchors by the first-order bi-level selection (module docstring).

    ``eta`` defaults to the preset's learning rate times the optimizer steps the method would
    take on k samples (an SGD stand-in for the run's budget); ``alpha`` to the preset's retain
    weight. Candidates: a seeded ``pool_fraction`` of ``forget``."""
    hyper, train = hyperparameters(method, hyperparameter_table)
    if eta is None:
        eta = train.lr * train.total_steps(k)
    if alpha is None:
        alpha = float(hyper.get("alpha", 0.0) or 0.0)
    pool_ids = set(anchor_pool([s.id for s in forget], pool_fraction, seed))
    candidates = [s for s in forget if s.id in pool_ids]
    if 2 * k > len(candidates):
        raise ConfigError(f"k={k} easy plus k hard anchors need at least {2 * k} candidates, "
                          f"got {len(candidates)}")
    params = default_parameters(lm.model, layers)
    loss, grads = per_sample_gradients(lm, candidates, params)
    if progress:
        progress(1, 2)
    gram = (grads.double() @ grads.double().T).numpy()
    r = np.zeros(len(candidates))
    if alpha and retain:
        _, g_r = per_sample_gradients(lm, list(retain), params)
        r = (grads.double() @ g_r.double().mean(0)).numpy()
    lv = loss.double().numpy()
    easy = select_subset(lv, gram, k, maximise=True, retain=r, eta=eta, alpha=alpha)
    rest = [i for i in range(len(candidates)) if i not in set(easy.indices)]
    sub = np.ix_(rest, rest)
    hard_local = select_subset(lv[rest], gram[sub], k, maximise=False, retain=r[rest], eta=eta,
                               alpha=alpha)
    hard = [rest[i] for i in hard_local.indices]
    if progress:
        progress(2, 2)
    easy_ids = [candidates[i].id for i in easy.indices]
    hard_ids = [candidates[i].id for i in hard]
    return AnchorSet(easy=easy_ids, hard=hard_ids, source="bilevel", excluded=easy_ids + hard_ids,
                     details={"method": method, "table": hyperparameter_table, "eta": eta,
                              "alpha": alpha, "k": k, "objective_easy": easy.objective,
                              "objective_hard": hard_local.objective, "layers": layers,
                              "n_parameters": int(grads.shape[1]), "pool_fraction": pool_fraction,
                              "seed": seed, "n_candidates": len(candidates)},
                     name=f"bilevel:{method}")
