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


def expert_layout(experts: nn.Module) -> tuple[bool, bool, bool]:
    """(is_transposed, is_concatenated, has_bias) of a transformers experts module."""
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
    transposed, _, has_bias = expert_layout(experts)
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


def expert_slots(stacks: dict[str, torch.Tensor], expert: int, transposed: bool,
                 concatenated: bool) -> dict[str, torch.Tensor]:
    """Views of one expert's rows in fused stacks of the given layout, in the nn.Linear convention and named by
    `ExpertWeights`' fields (biases only where the stacks have them): writing an expert is copying into them."""
    def linear(stack: torch.Tensor) -> torch.Tensor:  # [out, in]
        return stack[expert].T if transposed else stack[expert]

    def halves(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # gate, up
        return rows.chunk(2, dim=0) if concatenated else (rows[0::2], rows[1::2])

    slots = dict(zip(("gate", "up"), halves(linear(stacks["gate_up_proj"]))), down=linear(stacks["down_proj"]))
    if "gate_up_proj_bias" in stacks:
        slots.update(zip(("gate_bias", "up_bias"), halves(stacks["gate_up_proj_bias"][expert])))
    if "down_proj_bias" in stacks:
        slots["down_bias"] = stacks["down_proj_bias"][expert]
    return slots


def write_expert(stacks: dict[str, torch.Tensor], expert: int, weights, transposed: bool, concatenated: bool) -> None:
    """Copy one expert (`ExpertWeights`) into its rows of the stacks, straight from the tensors read: no packed
    copy in between (at Qwen3-30B-A3B's shapes that copy was a sixth of a layer's load)."""
    slots = expert_slots(stacks, expert, transposed, concatenated)
    for name, slot in slots.items():
        value = getattr(weights, name)
        if value is None or tuple(value.shape) != tuple(slot.shape):
            found = "none" if value is None else tuple(value.shape)
            raise M2DError(f"expert {expert}'s {name} has shape {found}, the model expects {tuple(slot.shape)}")
        slot.copy_(value)
    extra = [name for name in ("gate_bias", "up_bias", "down_bias")
             if name not in slots and getattr(weights, name) is not None]
    if extra:
        raise M2DError(f"expert {expert} has {', '.join(extra)}; the model's experts have none")


def pack_rows(weights, transposed: bool, concatenated: bool) -> dict[str, torch.Tensor]:
    """One expert (`ExpertWeights`, nn.Linear convention) as rows of fused stacks of the given layout, by the
    stacks' parameter names (biases only where the expert has them)."""
    width, hidden = weights.gate.shape
    stacks = {"gate_up_proj": weights.gate.new_empty((1, hidden, 2 * width) if transposed else (1, 2 * width, hidden)),
              "down_proj": weights.down.new_empty((1, width, hidden) if transposed else (1, hidden, width))}
    if weights.gate_bias is not None:
        stacks["gate_up_proj_bias"] = weights.gate_bias.new_empty(1, 2 * width)
    if weights.down_bias is not None:
        stacks["down_proj_bias"] = weights.down_bias.new_empty(1, hidden)
    write_expert(stacks, 0, weights, transposed, concatenated)
    return {name: stack[0] for name, stack in stacks.items()}


def pack_expert(experts: nn.Module, weights) -> dict[str, torch.Tensor]:
    """One expert as the rows of this experts module's stacks: the inverse of reading an expert out of them."""
    transposed, concatenated, has_bias = expert_layout(experts)
    rows = pack_rows(weights, transposed, concatenated)
    if has_bias != ("gate_up_proj_bias" in rows and "down_proj_bias" in rows):
        raise M2DError(f"{type(experts).__name__} {'has' if has_bias else 'has no'} expert biases; "
                       f"the checkpoint's experts {'lack them' if has_bias else 'have them'}")
    return rows
