"""The pieces a family declaration is made of: expert weights, their on-disk names, shared experts, routing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from transformers import PretrainedConfig


class Routing(NamedTuple):
    """What the router of one MoE block does to tokens x [T, H], computed by transformers' own router module."""

    logits: torch.Tensor  # [T, E] the router's logits
    weights: torch.Tensor  # [T, k] the weights the model applies (renormalisation, routed_scaling_factor included)
    indices: torch.Tensor  # [T, k] the experts it selects (DeepSeek-V3: with the selection-only correction bias)
    probs: torch.Tensor  # [T, E] the paper's p_t: softmax over all E experts (DeepSeek-V3: its sigmoid scores)


def softmax_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float())


def norm_topk_prob(config) -> bool:
    return bool(getattr(config, "norm_topk_prob", False))


@dataclass
class ExpertWeights:
    """One SwiGLU expert in the nn.Linear convention ([out, in]); biases only where the family has them."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate, self.up, self.down

    def flat(self) -> torch.Tensor:
        """Every parameter in one vector (weight clustering)."""
        parts = [self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias]
        return torch.cat([t.double().flatten() for t in parts if t is not None])


@dataclass(frozen=True)
class ExpertKeys:
    """On-disk names of the routed experts, relative to the MoE block. Both layouts are accepted on read:
    per-expert matrices (`{e}` is the expert index) and fused stacks over experts. Biases are read when the
    checkpoint has them (GPT-OSS); interleaved and input-major fused stacks are flags (GPT-OSS stores
    gate_up as [E, H, 2I] with gate and up in alternating columns)."""

    gate: str = "experts.{e}.gate_proj.weight"  # [I, H]
    up: str = "experts.{e}.up_proj.weight"  # [I, H]
    down: str = "experts.{e}.down_proj.weight"  # [H, I]
    gate_bias: str = "experts.{e}.gate_proj.bias"
    up_bias: str = "experts.{e}.up_proj.bias"
    down_bias: str = "experts.{e}.down_proj.bias"
    fused_gate_up: str = "experts.gate_up_proj"  # [E, 2I, H], gate rows first, then up rows
    fused_down: str = "experts.down_proj"  # [E, H, I]
    fused_gate_up_bias: str = "experts.gate_up_proj_bias"  # [E, 2I]
    fused_down_bias: str = "experts.down_proj_bias"  # [E, H]
    fused_input_major: bool = False  # stacks stored as [E, H, 2I] and [E, I, H]
    fused_interleaved: bool = False  # gate/up alternate (even = gate, odd = up) instead of two halves
    fused_on_disk: bool = False  # what save_pretrained writes: fused stacks (GPT-OSS), else per-expert matrices


@dataclass(frozen=True)
class SharedExpert:
    """Always-on experts, stored as one SwiGLU MLP. `gate` names a sigmoid gate (Qwen2-MoE) whose input-dependent
    value is folded into the down projection as its calibration mean; None: added unscaled (DeepSeek, EMO-like)."""

    gate_proj: str = "shared_expert.gate_proj.weight"
    up_proj: str = "shared_expert.up_proj.weight"
    down_proj: str = "shared_expert.down_proj.weight"
    gate: str | None = "shared_expert_gate.weight"
    width: Callable[[PretrainedConfig], int] = lambda config: int(config.shared_expert_intermediate_size)


def split_halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.chunk(2, dim=0)


def split_interleaved(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t[0::2].contiguous(), t[1::2].contiguous()
