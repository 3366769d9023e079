"""Family adapters, one small declaration per MoE family, looked up by the checkpoint's model_type."""

from __future__ import annotations

from megatron_m2d.errors import M2DError
from megatron_m2d.families.base import Family
from megatron_m2d.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from megatron_m2d.families.gpt_oss import GPT_OSS
from megatron_m2d.families.mixtral import MIXTRAL
from megatron_m2d.families.olmoe import OLMOE
from megatron_m2d.families.qwen2_moe import QWEN2_MOE
from megatron_m2d.families.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.model_type: f for f in (QWEN3_MOE, QWEN2_MOE, MIXTRAL, OLMOE, DEEPSEEK_V2,
                                                             DEEPSEEK_V3, GPT_OSS)}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        family = FAMILIES[model_type]
        if family.num_experts(config) < 1 or not family.moe_layers(config):
            raise M2DError(f"{model_type} model has no MoE layers: nothing to densify")
        return family
    looks_moe = any(hasattr(config, name) for name in ("num_experts", "num_local_experts", "n_routed_experts"))
    if looks_moe:
        raise M2DError(f"unknown MoE family {model_type!r} (supported: {', '.join(FAMILIES)})")
    raise M2DError(f"{model_type!r} is not a MoE model (supported families: {', '.join(FAMILIES)})")


__all__ = ["FAMILIES", "Family", "family_of"]
