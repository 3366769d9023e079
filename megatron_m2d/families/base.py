"""The adapter interface: what an MoE family looks like on disk and what dense model it becomes.

Each family file is a short declaration (names of keys and config fields); the logic that reads experts,
decides which layers are MoE and builds the dense config lives here once.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AutoConfig, PretrainedConfig

from megatron_m2d.errors import M2DError

LAYERS = "model.layers"


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


@dataclass(frozen=True)
class SharedExpert:
    """An always-on expert. `gate` names a sigmoid gate (Qwen2-MoE) whose input-dependent value is folded into
    the down projection as its calibration mean; None means the expert is added unscaled (DeepSeek)."""

    gate_proj: str = "shared_expert.gate_proj.weight"
    up_proj: str = "shared_expert.up_proj.weight"
    down_proj: str = "shared_expert.down_proj.weight"
    gate: str | None = "shared_expert_gate.weight"
    width_field: str = "shared_expert_intermediate_size"


def _split_halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.chunk(2, dim=0)


def _split_interleaved(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t[0::2].contiguous(), t[1::2].contiguous()


def _sparse_step_layers(config: PretrainedConfig) -> list[int]:
    """Qwen2/3-MoE: layer i is MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(config, "mlp_only_layers", []) or [])
    return [i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0]


def _all_layers(config: PretrainedConfig) -> list[int]:
    return list(range(config.num_hidden_layers))


@dataclass(frozen=True)
class Family:
    model_type: str
    moe_block: str  # on-disk module name of the MoE block inside a decoder layer
    dense_model_type: str | None  # transformers' dense class; None: the one-expert rule (families.md)
    experts: ExpertKeys = field(default_factory=ExpertKeys)
    router: str = "gate.weight"
    num_experts_field: str = "num_experts"
    top_k_field: str = "num_experts_per_tok"
    width_field: str = "moe_intermediate_size"
    dense_width_field: str = "intermediate_size"  # width of the teacher's own dense layers, if any
    always_renormalizes: bool = False  # Mixtral: softmax over the selected logits
    shared: SharedExpert | None = None
    moe_layers_of: Callable[[PretrainedConfig], list[int]] = _all_layers
    moe_config_fields: tuple[str, ...] = ()  # config fields that only mean something for the MoE
    router_fn: Callable | None = None  # (moe_block, x) -> (logits, weights, indices); None: moe_block.gate(x)

    # ---- config facts -------------------------------------------------------------------------------------
    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_field))

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_field))

    def expert_width(self, config) -> int:
        return int(getattr(config, self.width_field))

    def renormalizes(self, config) -> bool:
        return self.always_renormalizes or bool(getattr(config, "norm_topk_prob", False))

    def routed_scaling(self, config) -> float:
        return float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)

    def moe_layers(self, config) -> list[int]:
        return self.moe_layers_of(config)

    def shared_width(self, config) -> int:
        return int(getattr(config, self.shared.width_field)) if self.shared else 0

    # ---- on-disk names ------------------------------------------------------------------------------------
    def block_key(self, layer: int, name: str) -> str:
        return f"{LAYERS}.{layer}.{self.moe_block}.{name}"

    def is_routed_expert_key(self, layer: int, key: str) -> bool:
        head = f"{LAYERS}.{layer}.{self.moe_block}.experts."
        return key.startswith(head)

    def read_expert(self, ckpt, layer: int, expert: int) -> ExpertWeights:
        """One routed expert, from either on-disk layout, in the nn.Linear convention."""
        keys = self.experts
        per_expert = self.block_key(layer, keys.gate.format(e=expert))
        if ckpt.has(per_expert):
            def optional(template):
                key = self.block_key(layer, template.format(e=expert))
                return ckpt.get(key) if ckpt.has(key) else None
            return ExpertWeights(ckpt.get(per_expert), ckpt.get(self.block_key(layer, keys.up.format(e=expert))),
                                 ckpt.get(self.block_key(layer, keys.down.format(e=expert))),
                                 optional(keys.gate_bias), optional(keys.up_bias), optional(keys.down_bias))
        fused = self.block_key(layer, keys.fused_gate_up)
        if not ckpt.has(fused):
            raise M2DError(f"layer {layer}: no weights for expert {expert} (looked for {per_expert} and {fused})")
        gate_up, down = ckpt.get_row(fused, expert), ckpt.get_row(self.block_key(layer, keys.fused_down), expert)
        if keys.fused_input_major:
            gate_up, down = gate_up.T.contiguous(), down.T.contiguous()
        bias_key, down_bias_key = (self.block_key(layer, keys.fused_gate_up_bias),
                                   self.block_key(layer, keys.fused_down_bias))
        gate_up_bias = ckpt.get_row(bias_key, expert) if ckpt.has(bias_key) else None
        split = _split_interleaved if keys.fused_interleaved else _split_halves
        gate, up = split(gate_up)
        gate_bias, up_bias = split(gate_up_bias) if gate_up_bias is not None else (None, None)
        down_bias = ckpt.get_row(down_bias_key, expert) if ckpt.has(down_bias_key) else None
        return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)

    def read_shared(self, ckpt, layer: int) -> ExpertWeights | None:
        if self.shared is None:
            return None
        s = self.shared
        return ExpertWeights(*(ckpt.get(self.block_key(layer, name)) for name in (s.gate_proj, s.up_proj, s.down_proj)))

    def route(self, moe_block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [T, E], routing weights [T, k], expert indices [T, k]) exactly as the model routes.
        transformers' routers of these families return that triple; a family whose router differs (sigmoid
        scores with a selection-only correction bias, group-limited top-k) supplies `router_fn`."""
        if self.router_fn is not None:
            return self.router_fn(moe_block, x)
        return moe_block.gate(x)

    # ---- the dense target ---------------------------------------------------------------------------------
    def dense_layout(self, config, width: int) -> str:
        """'dense' when transformers' dense class represents the student exactly, else 'one_expert'."""
        if self.dense_model_type is None:
            return "one_expert"
        teacher_dense = [i for i in range(config.num_hidden_layers) if i not in self.moe_layers(config)]
        if teacher_dense and int(getattr(config, self.dense_width_field)) != width:
            # The dense class has one intermediate_size for all layers; the teacher's own dense layers keep
            # theirs, so only the family's class (with moe widths separate from dense widths) represents both.
            return "one_expert"
        return "dense"

    def dense_config(self, config, width: int) -> PretrainedConfig:
        if self.dense_layout(config, width) == "one_expert":
            target = copy.deepcopy(config)  # setattr, not a dict: configs alias fields (num_experts)
            for name, value in ((self.num_experts_field, 1), (self.top_k_field, 1), (self.width_field, width)):
                setattr(target, name, value)
            return target
        values = config.to_dict()
        aliases = getattr(config, "attribute_map", {})
        for key in ("architectures", "model_type", "transformers_version", "_name_or_path", "auto_map"):
            values.pop(key, None)
        for key in self.moe_config_fields:
            values.pop(key, None)
            values.pop(aliases.get(key, key), None)
        values[self.dense_width_field] = width
        return AutoConfig.for_model(self.dense_model_type, **values)

    def dense_ffn_keys(self, layout: str, layer: int) -> dict[str, str]:
        """Target names of the dense FFN's gate/up/down (and, for one_expert, the router) in layer `layer`."""
        if layout == "dense":
            base = f"{LAYERS}.{layer}.mlp."
            return {"gate": base + "gate_proj.weight", "up": base + "up_proj.weight", "down": base + "down_proj.weight"}
        keys = self.experts
        return {"gate": self.block_key(layer, keys.gate.format(e=0)), "up": self.block_key(layer, keys.up.format(e=0)),
                "down": self.block_key(layer, keys.down.format(e=0)), "router": self.block_key(layer, self.router)}
