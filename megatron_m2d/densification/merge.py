"""Merging a group into one expert, scaling the groups' down projections, and concatenating the dense FFN.

The MoE output sum_i g_i E_i(x) is approximated by sum_g s_g E_g(x): the k group representatives side by side
along the intermediate dimension (gate/up rows, down columns), each down projection multiplied by s_g.
"""

from __future__ import annotations

import torch

from megatron_m2d.errors import M2DError
from megatron_m2d.families.base import ExpertWeights

FIELDS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")

MERGES = ("average", "partial")
SCALINGS = ("uniform", "proportional", "score_proportional")


def merge_weights(importance: torch.Tensor, members: list[int]) -> torch.Tensor:
    """Normalised merge weights of a group's members (uniform when every member has zero importance)."""
    w = importance[members].double().clamp(min=0)
    if float(w.sum()) <= 0:
        w = torch.ones(len(members), dtype=torch.float64)
    return w / w.sum()


def merge_group(experts: list[ExpertWeights], weights: torch.Tensor, mode: str = "average",
                alpha: float = 0.5) -> ExpertWeights:
    """'average': theta = sum_i w_i theta_i (w normalised; REAP's frequency-weighted merge has this form).
    'partial' (our reading of SlimQwen's partial preservation): the dominant (first) member is kept and only a
    fraction alpha of the others' weighted offset from it is merged in,
    theta = theta_0 + alpha * sum_{i>0} w_i (theta_i - theta_0); alpha = 1 is 'average', alpha = 0 keeps theta_0.
    Every parameter, biases included, is merged the same way."""
    if mode not in MERGES:
        raise M2DError(f"unknown merge {mode!r} (choose from {', '.join(MERGES)})")
    if len(experts) == 1:
        return experts[0]
    weights = weights.float()
    merged = {}
    for name in FIELDS:  # float32: merging a few bf16/fp32 matrices loses nothing at that precision
        values = [getattr(e, name) for e in experts]
        if values[0] is None:
            continue
        stack = torch.stack([v.float() for v in values])
        if mode == "average":
            merged[name] = torch.einsum("n,n...->...", weights, stack)
        else:
            merged[name] = stack[0] + alpha * torch.einsum("n,n...->...", weights[1:], stack[1:] - stack[0])
        del stack
    return ExpertWeights(**merged)


def group_scales(groups: list[list[int]], postselect: torch.Tensor, scaling: str, routed_scaling: float,
                 mean_total_weight: float, importance: torch.Tensor | None = None) -> list[float]:
    """Down-projection scale of each group (README "Down-projection scaling" states the rules and sources).

    uniform:            s_g = routed_scaling / k, the paper's uniform scaling (1/k; the PEFT port's 1/K) times
                        the model's own routed_scaling_factor: exact when all experts are identical and the router
                        renormalises.
    proportional:       s_g = R * A_g / sum_h A_h, A_g = sum_{i in g} a_i (a_i: the expected routing weight of
                        expert i) and R = E_t[sum_{i in S_t} w_t,i], the mean total weight the model applies
                        (routed_scaling_factor included; 1 for renormalising routers without one): sum_g s_g = R.
    score_proportional: the same with A_g = the summed scoring importance of the group's experts (the paper's
                        Appendix H variant, as the PEFT moe_to_dense port describes it).
    A group mass of zero everywhere falls back to uniform.
    """
    k = len(groups)
    if scaling == "uniform":
        return [routed_scaling / k] * k
    if scaling not in SCALINGS:
        raise M2DError(f"unknown scaling {scaling!r} (choose from {', '.join(SCALINGS)})")
    source = postselect if scaling == "proportional" else importance
    mass = torch.stack([source[g].double().clamp(min=0).sum() for g in groups])
    if float(mass.sum()) <= 0:
        return [routed_scaling / k] * k
    return (mean_total_weight * mass / mass.sum()).tolist()


def concat_dense(representatives: list[ExpertWeights], scales: list[float], shared: ExpertWeights | None = None,
                 shared_scale: float = 1.0, dtype: torch.dtype = torch.float32) -> ExpertWeights:
    """One dense SwiGLU FFN: representatives (then the shared expert) side by side, downs scaled. Written into
    preallocated tensors of the output dtype, so no float copy of the whole FFN is ever made twice.
    Biases (GPT-OSS): gate/up biases concatenate with their rows; the down bias is sum_g s_g b_g."""
    parts = list(zip(representatives, scales))
    if shared is not None:
        parts.append((shared, shared_scale))
    width = sum(e.gate.shape[0] for e, _ in parts)
    hidden = parts[0][0].gate.shape[1]
    has_bias = any(e.gate_bias is not None or e.down_bias is not None for e, _ in parts)
    out = ExpertWeights(torch.empty(width, hidden, dtype=dtype), torch.empty(width, hidden, dtype=dtype),
                        torch.empty(hidden, width, dtype=dtype))
    if has_bias:
        out.gate_bias, out.up_bias = torch.zeros(width, dtype=dtype), torch.zeros(width, dtype=dtype)
        down_bias = torch.zeros(hidden, dtype=torch.float32)
    start = 0
    for expert, scale in parts:
        end = start + expert.gate.shape[0]
        out.gate[start:end] = expert.gate
        out.up[start:end] = expert.up
        out.down[:, start:end] = expert.down.float() * scale
        if has_bias:
            for name in ("gate_bias", "up_bias"):
                if getattr(expert, name) is not None:
                    getattr(out, name)[start:end] = getattr(expert, name)
            if expert.down_bias is not None:
                down_bias += scale * expert.down_bias.float()
        start = end
    if has_bias:
        out.down_bias = down_bias.to(dtype)
    return out
