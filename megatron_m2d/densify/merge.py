"""Merging a group into one expert, scaling the groups' down projections, and concatenating the dense FFN.

The MoE output sum_i g_i E_i(x) is approximated by sum_g s_g E_g(x): the k group representatives side by side
along the intermediate dimension (gate/up rows, down columns), each down projection multiplied by s_g.
"""

from __future__ import annotations

import torch

from megatron_m2d.errors import M2DError

Expert = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]

MERGES = ("average", "partial")
SCALINGS = ("uniform", "proportional")


def merge_weights(importance: torch.Tensor, members: list[int]) -> torch.Tensor:
    """Normalised merge weights of a group's members (uniform when every member has zero importance)."""
    w = importance[members].double().clamp(min=0)
    if float(w.sum()) <= 0:
        w = torch.ones(len(members), dtype=torch.float64)
    return w / w.sum()


def merge_group(experts: list[Expert], weights: torch.Tensor, mode: str = "average", alpha: float = 0.5) -> Expert:
    """'average': theta = sum_i w_i theta_i (w normalised; REAP's frequency-weighted merge has this form).
    'partial' (our reading of SlimQwen's partial preservation): the dominant (first) member is kept and only a
    fraction alpha of the others' weighted offset from it is merged in,
    theta = theta_0 + alpha * sum_{i>0} w_i (theta_i - theta_0); alpha = 1 is 'average', alpha = 0 keeps theta_0."""
    if mode not in MERGES:
        raise M2DError(f"unknown merge {mode!r} (choose from {', '.join(MERGES)})")
    if len(experts) == 1:
        return experts[0]
    merged = []
    for part in range(3):
        stack = torch.stack([e[part].double() for e in experts])
        if mode == "average":
            value = torch.einsum("n,n...->...", weights, stack)
        else:
            offsets = stack[1:] - stack[0]
            value = stack[0] + alpha * torch.einsum("n,n...->...", weights[1:], offsets)
        merged.append(value)
    return tuple(merged)


def group_scales(groups: list[list[int]], postselect: torch.Tensor, scaling: str, routed_scaling: float,
                 mean_total_weight: float) -> list[float]:
    """Down-projection scale of each group.

    uniform:      s_g = routed_scaling / k  (exact when all experts are identical and routing renormalises)
    proportional: s_g = R * A_g / sum_h A_h with A_g = sum_{i in g} a_i (expected routing weight of the group's
                  experts) and R = routed_scaling * E_t[sum_{i in S_t} g_t,i], the mean total routed weight
                  (1 for renormalising routers); so sum_g s_g = R.
    """
    k = len(groups)
    if scaling == "uniform":
        return [routed_scaling / k] * k
    if scaling == "proportional":
        mass = torch.stack([postselect[g].double().sum() for g in groups])
        if float(mass.sum()) <= 0:
            return [routed_scaling / k] * k
        total = routed_scaling * mean_total_weight
        return (total * mass / mass.sum()).tolist()
    raise M2DError(f"unknown scaling {scaling!r} (choose from {', '.join(SCALINGS)})")


def concat_dense(representatives: list[Expert], scales: list[float], shared: Expert | None = None,
                 shared_scale: float = 1.0) -> Expert:
    """One dense SwiGLU FFN: representatives (then the shared expert) side by side, downs scaled."""
    parts = list(zip(representatives, scales))
    if shared is not None:
        parts.append((shared, shared_scale))
    gate = torch.cat([e[0].double() for e, _ in parts], dim=0)
    up = torch.cat([e[1].double() for e, _ in parts], dim=0)
    down = torch.cat([e[2].double() * s for e, s in parts], dim=1)
    return gate, up, down
