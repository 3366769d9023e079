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
from megatron_m2d.families.experts import pack_rows
from megatron_m2d.families.parts import (ExpertKeys, ExpertWeights, Routing, SharedExpert, norm_topk_prob,
                                         softmax_probs, split_halves, split_interleaved)

LAYERS = "model.layers"
__all__ = ["LAYERS", "ExpertKeys", "ExpertWeights", "Family", "Routing", "SharedExpert"]


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
    router: str = "gate.weight"  # on-disk name of the router weight; its module computes the routing
    num_experts_field: str = "num_experts"
    top_k_field: str = "num_experts_per_tok"
    width_field: str = "moe_intermediate_size"
    dense_width_field: str = "intermediate_size"  # width of the teacher's own dense layers, if any
    renormalizes_of: Callable[[PretrainedConfig], bool] = norm_topk_prob  # top-k weights sum to 1
    probabilities: Callable[[torch.Tensor], torch.Tensor] = softmax_probs  # logits -> the paper's p_t
    shared: SharedExpert | None = None
    moe_layers_of: Callable[[PretrainedConfig], list[int]] = _all_layers
    moe_config_fields: tuple[str, ...] = ()  # config fields that only mean something for the MoE
    # The family's own class with every layer dense (DeepSeek): config overrides that make it so. Its dense layers
    # share one width, so the narrower of (teacher's dense layers, densified FFN) is zero-padded to the wider.
    all_dense: Callable[[PretrainedConfig], dict] | None = None
    attention: str = "sdpa"  # attention implementation the streamed layers run (GPT-OSS's sinks need eager)

    # ---- config facts -------------------------------------------------------------------------------------
    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_field))

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_field))

    def expert_width(self, config) -> int:
        return int(getattr(config, self.width_field))

    def renormalizes(self, config) -> bool:
        return bool(self.renormalizes_of(config))

    def routed_scaling(self, config) -> float:
        return float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)

    def moe_layers(self, config) -> list[int]:
        return self.moe_layers_of(config)

    def shared_width(self, config) -> int:
        return int(self.shared.width(config) or 0) if self.shared else 0

    # ---- on-disk names ------------------------------------------------------------------------------------
    def block_key(self, layer: int, name: str) -> str:
        return f"{LAYERS}.{layer}.{self.moe_block}.{name}"

    def is_routed_expert_key(self, layer: int, key: str) -> bool:
        head = f"{LAYERS}.{layer}.{self.moe_block}.experts."
        return key.startswith(head)

    def router_keys(self, layer: int) -> list[str]:
        """The router's on-disk tensors (weight, and GPT-OSS's bias / DeepSeek-V3's correction bias)."""
        module = self.router.rsplit(".", 1)[0]
        return [self.block_key(layer, f"{module}.{name}") for name in ("weight", "bias", "e_score_correction_bias")]

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
        split = split_interleaved if keys.fused_interleaved else split_halves
        gate, up = split(gate_up)
        gate_bias, up_bias = split(gate_up_bias) if gate_up_bias is not None else (None, None)
        down_bias = ckpt.get_row(down_bias_key, expert) if ckpt.has(down_bias_key) else None
        return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)

    def check_experts(self, ckpt) -> None:
        """Every MoE layer holds exactly the config's number of routed experts (read from the index and the
        tensor headers only): a checkpoint that disagrees with its config is refused before any work."""
        config, expected = ckpt.config, self.num_experts(ckpt.config)
        for layer in self.moe_layers(config):
            fused = self.block_key(layer, self.experts.fused_gate_up)
            if ckpt.has(fused):
                found = ckpt.shape(fused)[0]
            else:
                head = self.block_key(layer, "experts.")
                found = len({key[len(head):].split(".", 1)[0] for key in ckpt.layer_keys(layer) if key.startswith(head)})
            if found != expected:
                raise M2DError(f"layer {layer} of {ckpt.path} holds {found} routed experts, its config says "
                               f"{self.num_experts_field} = {expected}")

    def read_shared(self, ckpt, layer: int) -> ExpertWeights | None:
        if not self.shared_width(ckpt.config):
            return None
        s = self.shared
        return ExpertWeights(*(ckpt.get(self.block_key(layer, name)) for name in (s.gate_proj, s.up_proj, s.down_proj)))

    # ---- the model's own computation ----------------------------------------------------------------------
    def router_module(self, moe_block) -> torch.nn.Module:
        return moe_block.get_submodule(self.router.rsplit(".", 1)[0])

    def route(self, moe_block, x: torch.Tensor) -> Routing:
        """Selection and applied weights exactly as the model routes x [T, H]."""
        return self.routing(self.router_module(moe_block)(x))

    def routing(self, router_output) -> Routing:
        """The router module's own output, as the statistics read it (calibration hooks the router in the forward
        the model runs anyway): transformers' routers of every supported family return (logits, the weights the
        model applies, the selected indices). The weights stay as applied: DeepSeek's routed_scaling_factor is in
        them, and densify's scalings account for it."""
        logits, weights, indices = router_output[:3]
        return Routing(logits, weights, indices, self.probabilities(logits))

    # ---- the dense target ---------------------------------------------------------------------------------
    def teacher_dense_width(self, config) -> int | None:
        """FFN width of the teacher's own dense layers, None when it has none."""
        moe = set(self.moe_layers(config))
        if all(i in moe for i in range(config.num_hidden_layers)):
            return None
        return int(getattr(config, self.dense_width_field))

    def dense_layout(self, config, width: int) -> str:
        """'dense' when transformers' dense class represents the student exactly, else 'one_expert'."""
        if self.dense_model_type is None:
            return "one_expert"
        teacher_dense = self.teacher_dense_width(config)
        if self.all_dense is None and teacher_dense is not None and teacher_dense != width:
            # The dense class has one intermediate_size for all layers; the teacher's own dense layers keep
            # theirs, so only the family's class (with moe widths separate from dense widths) represents both.
            return "one_expert"
        return "dense"

    def dense_width(self, config, width: int) -> int:
        """intermediate_size of the dense student whose densified FFNs are `width` wide (padding families: the
        wider of that and the teacher's dense layers)."""
        teacher_dense = self.teacher_dense_width(config)
        return max(width, teacher_dense or 0) if self.all_dense is not None else width

    def dense_config(self, config, width: int) -> PretrainedConfig:
        if self.dense_layout(config, width) == "one_expert":
            target = copy.deepcopy(config)  # setattr, not a dict: configs alias fields (num_experts)
            for name, value in ((self.num_experts_field, 1), (self.top_k_field, 1), (self.width_field, width)):
                setattr(target, name, value)
            return _without_quantization(target)
        if self.all_dense is not None:
            target = copy.deepcopy(config)
            for name, value in {**self.all_dense(config), self.dense_width_field: self.dense_width(config, width)
                                }.items():
                setattr(target, name, value)
            return _without_quantization(target)
        values = config.to_dict()
        aliases = getattr(config, "attribute_map", {})
        for key in ("architectures", "model_type", "transformers_version", "_name_or_path", "auto_map",
                    "quantization_config"):
            values.pop(key, None)
        for key in self.moe_config_fields:
            values.pop(key, None)
            values.pop(aliases.get(key, key), None)
        values[self.dense_width_field] = width
        return AutoConfig.for_model(self.dense_model_type, **values)

    def dense_ffn_keys(self, layer: int) -> dict[str, str]:
        """Target names of the dense FFN's gate/up/down in layer `layer` of a 'dense' student."""
        base = f"{LAYERS}.{layer}.mlp."
        return {"gate": base + "gate_proj.weight", "up": base + "up_proj.weight", "down": base + "down_proj.weight"}

    def one_expert_tensors(self, layer: int, ffn: ExpertWeights, hidden: int) -> dict[str, torch.Tensor]:
        """The MoE block of a 'one_expert' student as written on disk: its single expert in the family's on-disk
        layout, and a zero router (one expert: its softmax weight is exactly 1.0 whatever the logit)."""
        keys = self.experts
        if keys.fused_on_disk:
            rows = pack_rows(ffn, keys.fused_input_major, not keys.fused_interleaved)
            names = {"gate_up_proj": keys.fused_gate_up, "down_proj": keys.fused_down,
                     "gate_up_proj_bias": keys.fused_gate_up_bias, "down_proj_bias": keys.fused_down_bias}
            out = {self.block_key(layer, names[name]): row.unsqueeze(0) for name, row in rows.items()}
        else:
            out = {self.block_key(layer, template.format(e=0)): value
                   for template, value in ((keys.gate, ffn.gate), (keys.up, ffn.up), (keys.down, ffn.down))}
        weight, bias = self.router_keys(layer)[:2]
        out[weight] = torch.zeros(1, hidden)
        out[bias] = torch.zeros(1)  # written only where the student has a router bias (GPT-OSS)
        return out


def _without_quantization(config: PretrainedConfig) -> PretrainedConfig:
    """The student is written dequantised (MXFP4 teachers): its config must not announce a quantisation."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
