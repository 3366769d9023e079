"""Expert scorings (methods.md): each a small pure function from a layer's statistics to the K kept experts.

Every scoring returns the kept experts most important first, and a non-negative importance per expert that
later ranks them inside groups and weights their merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_m2d.calibration.store import LayerStats
from megatron_m2d.errors import M2DError


RIDGES = ("selected", "groups")  # what the D-optimal ridge divides mean(diag K) by: K or k


@dataclass(frozen=True)
class KernelOptions:
    """How the D-optimal kernel K = diag(sqrt w) G diag(sqrt w) is built (methods.md leaves it open).

    gram: 'all' is the paper's E_t[<E_i, E_j>], every expert on every token (`calibrate --gram`): it is the
          only kernel that sees two functionally identical experts as duplicates, whatever the router does.
          'gated' uses E_t[g_i g_j <E_i, E_j>] (routing weights, zero for unselected experts): it needs no --gram
          pass and measured better pre-distillation perplexity on a trained MoE (methods.md), but it measures
          diversity of routed contributions, so identical experts that serve different tokens look distinct.
          'auto' (default): 'all' when the statistics have it, else 'gated'.
    activation: the ACP weight of gld_reap. 'reap' (default) is REAP's routed-token mean of g ||E_i||, the
          paper's ACP as REAP defines it; 'rms' is the public DO-ACP re-implementation's CP_i * sqrt(E_t ||E_i||^2)
          over all tokens (needs --gram). Both take CP as the Method's `cp` says.
    lambda_scale, ridge: lambda = lambda_scale * mean(diag K) / n with n = K, the number of experts selected
          ('selected', default: the public DO-ACP code's rule; in the paper's pipeline selection precedes
          grouping, so the kept set must not depend on k) or n = k, the number of groups ('groups': this
          project's earlier rule). They agree for pure pruning (K = k), the paper's headline setting.
    """

    gram: str = "auto"
    activation: str = "reap"
    lambda_scale: float = 1.0
    ridge: str = "selected"

    def __post_init__(self):
        if self.gram not in ("auto", "gated", "all"):
            raise M2DError(f"unknown kernel Gram {self.gram!r} (auto, gated, all)")
        if self.activation not in ("reap", "rms"):
            raise M2DError(f"unknown kernel activation {self.activation!r} (reap, rms)")
        if not self.lambda_scale > 0:
            raise M2DError("the kernel's lambda scale must be positive")
        if self.ridge not in RIDGES:
            raise M2DError(f"unknown kernel ridge {self.ridge!r} ({', '.join(RIDGES)})")


@dataclass
class Selection:
    experts: list[int]  # kept experts, most important first
    importance: torch.Tensor  # [E] float64, >= 0


def _top(scores: torch.Tensor, select: int) -> Selection:
    # Stable sort: ties go to the lower expert index, so results never depend on the sort implementation.
    order = sorted(range(scores.numel()), key=lambda e: (-float(scores[e]), e))
    return Selection(order[:select], scores.double().clamp(min=0))


def greedy_logdet(kernel: torch.Tensor, select: int, ridge: float) -> list[int]:
    """Greedy D-optimal design: repeatedly add the expert e maximising logdet(L[S+e, S+e]), L = K + ridge I.

    Incremental Cholesky (the fast greedy MAP of Chen et al., 2018): d2[e] is the Schur complement of e given
    S, so log d2[e] is exactly the marginal log-det gain; O(E K^2) instead of a determinant per candidate.
    """
    L = kernel.double() + ridge * torch.eye(kernel.shape[0], dtype=torch.float64)
    n = L.shape[0]
    d2 = L.diagonal().clone()
    factors = torch.zeros(select, n, dtype=torch.float64)
    chosen: list[int] = []
    available = torch.ones(n, dtype=torch.bool)
    for step in range(select):
        gains = torch.where(available, d2, torch.full_like(d2, -torch.inf))
        best = int(torch.argmax(gains))  # first index among equal gains
        chosen.append(best)
        available[best] = False
        if step + 1 == select:
            break
        row = (L[best] - factors[:step].T @ factors[:step, best]) / d2[best].clamp(min=1e-300).sqrt()
        factors[step] = row
        d2 = d2 - row**2
    return chosen


def _d_optimal(stats: LayerStats, select: int, groups: int, weight: torch.Tensor, options: KernelOptions) -> Selection:
    """Kernel K = diag(sqrt w) G diag(sqrt w). An expert of weight 0 (never routed) is a zero vector in it, so it
    is taken last, after any expert that adds something, duplicates included: it contributes nothing."""
    gram = stats.gram(stats.resolve_gram(options.gram))
    root = weight.double().clamp(min=0).sqrt()
    kernel = root[:, None] * gram * root[None, :]
    size = select if options.ridge == "selected" else groups
    ridge = options.lambda_scale * float(kernel.diagonal().mean()) / size
    if ridge <= 0:  # an all-zero kernel (no expert ever routed) leaves nothing to choose by
        ridge = options.lambda_scale
    return Selection(greedy_logdet(kernel, select, ridge), weight.double().clamp(min=0))


def _acp(stats: LayerStats, options: KernelOptions) -> torch.Tensor:
    if options.activation == "rms":
        return stats.conditional_prob * stats.gram("all").diagonal().clamp(min=0).sqrt()
    return stats.reap


ScoringFn = Callable[[LayerStats, int, int, KernelOptions, torch.Generator], Selection]

SCORINGS: dict[str, ScoringFn] = {
    "selection_freq": lambda s, K, k, o, g: _top(s.selection_freq, K),
    "preselect_prob": lambda s, K, k, o, g: _top(s.preselect_prob, K),
    "postselect_prob": lambda s, K, k, o, g: _top(s.postselect_prob, K),
    "conditional_prob": lambda s, K, k, o, g: _top(s.conditional_prob, K),
    "reap": lambda s, K, k, o, g: _top(s.reap, K),
    "gram_logdet": lambda s, K, k, o, g: _d_optimal(s, K, k, s.conditional_prob, o),
    "gld_reap": lambda s, K, k, o, g: _d_optimal(s, K, k, _acp(s, o), o),
    "random": lambda s, K, k, o, g: Selection(torch.randperm(s.num_experts, generator=g)[:K].tolist(),
                                              torch.ones(s.num_experts, dtype=torch.float64)),
}


def score_layer(stats: LayerStats, scoring: str, select: int, groups: int, options: KernelOptions,
                seed: int) -> Selection:
    if scoring not in SCORINGS:
        raise M2DError(f"unknown scoring {scoring!r} (choose from {', '.join(SCORINGS)})")
    generator = torch.Generator().manual_seed(seed * 100003 + stats.layer)  # each layer its own stream
    return SCORINGS[scoring](stats, select, groups, options, generator)
