"""HF <-> Megatron-Core table and config for the MoE teachers whose router and experts megatron-core expresses.

Attention, norms and embeddings are the dense twin's (`dense_mapping`); a MoE layer maps to Megatron's router
(`mlp.router.weight`), sequential experts (`mlp.experts.local_experts.{e}.linear_fc1/2`, fc1 = gate rows then up
rows) and, where the family has one, the shared expert (`mlp.shared_experts.*`, its sigmoid gate is
`gate_weight`). Megatron's grouped-GEMM experts store the same checkpoint keys, so a checkpoint written here
loads in either layout. Routing equivalence: softmax over all experts, top-k, renormalised == top-k on logits
then softmax over the selected (Megatron's default); without renormalisation, Megatron's pre-softmax routing.
"""

from __future__ import annotations

import copy

from megatron_m2d.convert import dense_mapping
from megatron_m2d.convert.mapping import Rows, Same, Spec
from megatron_m2d.errors import M2DError
from megatron_m2d.families import family_of

# MoE family -> the dense model type whose attention it shares
DENSE_TWIN = {"qwen3_moe": "qwen3", "mixtral": "mistral", "qwen2_moe": "qwen2"}
# What megatron-core cannot express, said precisely (README "Megatron-Core conversion" repeats it).
REFUSED = {
    "olmoe": "its q/k RMSNorm spans the whole projection (all heads together), while megatron-core's "
             "qk_layernorm normalises each head separately",
}


def is_moe(config) -> bool:
    return config.model_type in DENSE_TWIN or config.model_type in REFUSED


def check_supported(config):
    if config.model_type in REFUSED:
        raise M2DError(f"cannot convert {config.model_type} to Megatron-Core: {REFUSED[config.model_type]}")
    if config.model_type not in DENSE_TWIN:
        raise M2DError(f"no Megatron mapping for MoE model type {config.model_type!r}")
    family = family_of(config)
    twin = copy.deepcopy(config)
    twin.model_type = DENSE_TWIN[config.model_type]
    return family, twin


# Every teacher: routing as trained (no balancing loss), and the allgather dispatcher (the alltoall one needs
# CUDA streams; the same tokens reach the same experts either way).
TEACHER_ROUTING = dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                       moe_token_dispatcher_type="allgather")


def router_pre_softmax(model_type: str, renormalizes: bool, top_k: int, experts: int) -> bool:
    """megatron-core's `moe_router_pre_softmax`: softmax over all experts then top-k (a router that does not
    renormalise), else top-k then softmax over the k (== renormalised softmax top-k, and GPT-OSS). megatron-core
    refuses the latter at top-1, where a renormalising router's weight is always 1.0: with ONE expert (a
    densified one-expert student) pre-softmax gives 1.0 as well; over several experts nothing in megatron-core
    computes it."""
    if not renormalizes:
        return True
    if top_k != 1:
        return False
    if experts != 1:
        raise M2DError(f"cannot convert {model_type} with renormalised top-1 routing over {experts} experts: "
                       "megatron-core softmaxes over all experts before a top-1 choice (weight p_max, not 1.0)")
    return True


def layer_freq(moe_layers, num_layers: int) -> int | list[int]:
    """megatron-core's moe_layer_freq: a list only when layers differ, since a list changes the checkpoint keys
    (per-layer instead of stacked)."""
    moe_layers = set(moe_layers)
    return 1 if len(moe_layers) == num_layers else [int(i in moe_layers) for i in range(num_layers)]


def config_kwargs(config) -> dict:
    """TransformerConfig fields of a MoE teacher: its dense twin's, plus the MoE blocks'."""
    family, twin = check_supported(config)
    kwargs = dict(dense_mapping.config_kwargs(twin), num_moe_experts=family.num_experts(config),
                  moe_router_topk=family.top_k(config), moe_ffn_hidden_size=family.expert_width(config),
                  moe_router_pre_softmax=router_pre_softmax(config.model_type, family.renormalizes(config),
                                                            family.top_k(config), family.num_experts(config)),
                  moe_layer_freq=layer_freq(family.moe_layers(config), config.num_hidden_layers), **TEACHER_ROUTING)
    if family.shared:
        kwargs.update(moe_shared_expert_intermediate_size=family.shared_width(config),
                      moe_shared_expert_gate=family.shared.gate is not None)
    if family.routed_scaling(config) != 1.0:
        kwargs["moe_router_topk_scaling_factor"] = family.routed_scaling(config)
    return kwargs


def moe_layer_table(config, family, layer: int) -> dict[str, Spec]:
    m = f"decoder.layers.{layer}.mlp."
    block = lambda name: family.block_key(layer, name)  # noqa: E731
    keys = family.experts
    table: dict[str, Spec] = {m + "router.weight": Same(block(family.router))}
    for e in range(family.num_experts(config)):
        expert = f"{m}experts.local_experts.{e}."
        table[expert + "linear_fc1.weight"] = Rows((block(keys.gate.format(e=e)), block(keys.up.format(e=e))))
        table[expert + "linear_fc2.weight"] = Same(block(keys.down.format(e=e)))
    if family.shared:
        shared = family.shared
        table[m + "shared_experts.linear_fc1.weight"] = Rows((block(shared.gate_proj), block(shared.up_proj)))
        table[m + "shared_experts.linear_fc2.weight"] = Same(block(shared.down_proj))
        if shared.gate:  # [1, H]: megatron-core's moe_shared_expert_gate computes the same sigmoid(x @ g.T)
            table[m + "shared_experts.gate_weight"] = Same(block(shared.gate))
    return table


def table(config, vocab_rows: int | None = None) -> dict[str, Spec]:
    family, twin = check_supported(config)
    moe_layers = set(family.moe_layers(config))
    out = dense_mapping.global_table(twin, vocab_rows or config.vocab_size)
    for i in range(config.num_hidden_layers):
        out |= dense_mapping.attention_table(twin, i)
        if i in moe_layers:
            out |= moe_layer_table(config, family, i)
        else:
            out |= dense_mapping.gated_mlp_table(f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp.")
    return out
