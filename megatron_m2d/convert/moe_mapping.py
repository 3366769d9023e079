"""HF <-> Megatron-Core for the MoE teachers whose router and experts Megatron-Core expresses exactly.

Attention and norms map as for the dense students (`dense_mapping`, with the family's dense twin); the MoE block
maps to Megatron's router (`mlp.router.weight`) and sequential experts
(`mlp.experts.local_experts.{e}.linear_fc1/linear_fc2`, fc1 = gate rows then up rows). Routing equivalence:
softmax over all experts, top-k, renormalised == top-k on logits, softmax over the selected (Megatron's default,
moe_router_pre_softmax False); without renormalisation Megatron's pre-softmax routing matches.
"""

from __future__ import annotations

import copy

import torch

from megatron_m2d.convert import dense_mapping
from megatron_m2d.errors import M2DError
from megatron_m2d.families import family_of

# MoE family -> the dense model type whose attention it shares
DENSE_TWIN = {"qwen3_moe": "qwen3", "mixtral": "mistral"}
REFUSED = {
    "qwen2_moe": "its shared expert is scaled by an input-dependent sigmoid gate that megatron-core's shared "
                 "expert does not reproduce exactly in the local spec",
    "olmoe": "its q/k RMSNorm spans the whole projection, while megatron-core normalises per head",
}


def check_supported(config):
    if config.model_type in REFUSED:
        raise M2DError(f"cannot convert {config.model_type} to Megatron-Core without changing the model: "
                       f"{REFUSED[config.model_type]}")
    if config.model_type not in DENSE_TWIN:
        raise M2DError(f"no Megatron mapping for MoE model type {config.model_type!r}")
    family = family_of(config)
    if len(family.moe_layers(config)) != config.num_hidden_layers:
        raise M2DError("teachers with dense layers between MoE layers are not supported by this converter yet")
    twin = copy.deepcopy(config)
    twin.model_type = DENSE_TWIN[config.model_type]
    return family, twin


def moe_config_kwargs(config) -> dict:
    """TransformerConfig fields of the MoE block (on top of `transformer_config_kwargs` of the dense twin)."""
    family, _ = check_supported(config)
    return dict(num_moe_experts=family.num_experts(config), moe_router_topk=family.top_k(config),
                moe_ffn_hidden_size=family.expert_width(config),
                moe_router_pre_softmax=not family.renormalizes(config),
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                # allgather: the alltoall dispatcher needs CUDA streams; the same tokens reach the same experts
                moe_token_dispatcher_type="allgather")


def _expert_tensors(hf: dict, family, config, layer: int):
    """(gate_up [E, 2I, H], down [E, H, I]) from transformers' in-memory layout or the on-disk per-expert one."""
    fused = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    if fused in hf:
        return hf[fused], hf[f"model.layers.{layer}.mlp.experts.down_proj"]
    keys, block = family.experts, f"model.layers.{layer}.{family.moe_block}."
    experts = range(family.num_experts(config))
    gate_up = torch.stack([torch.cat([hf[block + keys.gate.format(e=e)], hf[block + keys.up.format(e=e)]])
                           for e in experts])
    return gate_up, torch.stack([hf[block + keys.down.format(e=e)] for e in experts])


def hf_to_megatron(hf: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    family, twin = check_supported(config)
    out = dense_mapping.hf_to_megatron(hf, twin, mlp=False)
    for i in range(config.num_hidden_layers):
        prefix = f"decoder.layers.{i}.mlp."
        router = f"model.layers.{i}.mlp.gate.weight"
        out[prefix + "router.weight"] = hf[router if router in hf else family.block_key(i, family.router)]
        gate_up, down = _expert_tensors(hf, family, config, i)
        for e in range(gate_up.shape[0]):
            out[prefix + f"experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
            out[prefix + f"experts.local_experts.{e}.linear_fc2.weight"] = down[e]
    return out


def megatron_to_hf(mega: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Back to the on-disk HF layout (per-expert keys, as transformers saves and the hub serves them)."""
    family, twin = check_supported(config)
    out = dense_mapping.megatron_to_hf(mega, twin, mlp=False)
    keys = family.experts
    for i in range(config.num_hidden_layers):
        prefix = f"decoder.layers.{i}.mlp."
        out[family.block_key(i, family.router)] = mega[prefix + "router.weight"]
        for e in range(family.num_experts(config)):
            gate, up = mega[prefix + f"experts.local_experts.{e}.linear_fc1.weight"].chunk(2, dim=0)
            out[family.block_key(i, keys.gate.format(e=e))] = gate.contiguous()
            out[family.block_key(i, keys.up.format(e=e))] = up.contiguous()
            out[family.block_key(i, keys.down.format(e=e))] = mega[prefix + f"experts.local_experts.{e}.linear_fc2.weight"]
    return out
