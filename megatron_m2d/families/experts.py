"""How one routed expert is computed, for every transformers experts module, and how one expert is packed into it.

transformers (>= 5) keeps the experts of every family as fused 3-D stacks and describes their layout with the flags
its `use_experts_implementation` decorator sets: `is_transposed` ([E, H, 2I] input-major, GPT-OSS) or not
([E, 2I, H]), `is_concatenated` (gate rows then up rows) or interleaved (even = gate, odd = up, GPT-OSS), and
`has_bias`. The gated activation is the module's own `_apply_gate` (SwiGLU; GPT-OSS's clamped variant). Reading
those flags and calling `_apply_gate` computes exactly what transformers computes, without a copy of any family's
expert code here. Written by hand because transformers only exposes the routed forward (a weighted sum over the
selected experts), not one expert's output before gating, which the statistics need.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_m2d.errors import M2DError


def _flags(experts: nn.Module) -> tuple[bool, bool, bool]:
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "_apply_gate"):
        raise M2DError(f"{type(experts).__name__} is not a transformers gated experts module")
    return (bool(getattr(experts, "is_transposed", False)), bool(getattr(experts, "is_concatenated", True)),
            bool(getattr(experts, "has_bias", False)))


@torch.no_grad()
def expert_outputs(experts: nn.Module, x: torch.Tensor, ids: list[int] | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """E_i(x) for the experts `ids` (all by default) on every token of x [T, H]: [len(ids), T, H] (written into
    `out` when given), before gating. One expert at a time: its [T, 2I] gate/up product stays in cache through the
    gate and the down projection, which writes straight into its rows of the result, and each expert's two GEMMs
    are as large as T allows. On Qwen3-30B-A3B's shapes (CPU, bf16, 1,084 tokens) this ran at ~1.6x the rate of
    one GEMM against the whole [E*2I, H] stack followed by a batched down projection, which passes the [E, T, 2I]
    product through memory in a transposed layout that the gate and the batched GEMM then copy."""
    transposed, _, has_bias = _flags(experts)
    ids = range(experts.num_experts) if ids is None else ids
    if out is None:
        out = x.new_empty(len(ids), x.shape[0], x.shape[-1])
    for row, expert in enumerate(ids):
        gate_up, down = experts.gate_up_proj[expert], experts.down_proj[expert]
        hidden = x @ gate_up if transposed else nn.functional.linear(x, gate_up)
        if has_bias:
            hidden += experts.gate_up_proj_bias[expert]
        torch.matmul(experts._apply_gate(hidden), down if transposed else down.T, out=out[row])
        if has_bias:
            out[row] += experts.down_proj_bias[expert]
        if getattr(experts, "has_post_expert_norm", False):  # part of the expert's output the model sums
            out[row] = experts.post_expert_norm(out[row])
    return out


def expert_forward(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """E_expert(x) [T, H]: one expert's output before gating."""
    return expert_outputs(experts, x, [expert])[0]


def pack_rows(weights, transposed: bool, concatenated: bool) -> dict[str, torch.Tensor]:
    """One expert (`ExpertWeights`, nn.Linear convention) as rows of fused stacks of the given layout, by the
    stacks' parameter names (biases only where the expert has them)."""
    if concatenated:
        gate_up = torch.cat([weights.gate, weights.up])
        bias = None if weights.gate_bias is None else torch.cat([weights.gate_bias, weights.up_bias])
    else:  # interleaved rows: gate_0, up_0, gate_1, up_1, ...
        gate_up = torch.stack([weights.gate, weights.up], dim=1).flatten(0, 1)
        bias = None if weights.gate_bias is None else torch.stack([weights.gate_bias, weights.up_bias], 1).flatten()
    rows = {"gate_up_proj": gate_up.T if transposed else gate_up,
            "down_proj": weights.down.T if transposed else weights.down}
    if bias is not None:
        rows["gate_up_proj_bias"] = bias
    if weights.down_bias is not None:
        rows["down_proj_bias"] = weights.down_bias
    return {name: value.contiguous() for name, value in rows.items()}


def pack_expert(experts: nn.Module, weights) -> dict[str, torch.Tensor]:
    """One expert as the rows of this experts module's stacks: the inverse of reading an expert out of them."""
    transposed, concatenated, has_bias = _flags(experts)
    rows = pack_rows(weights, transposed, concatenated)
    if has_bias != ("gate_up_proj_bias" in rows and "down_proj_bias" in rows):
        raise M2DError(f"{type(experts).__name__} {'has' if has_bias else 'has no'} expert biases; "
                       f"the checkpoint's experts {'lack them' if has_bias else 'have them'}")
    return rows
