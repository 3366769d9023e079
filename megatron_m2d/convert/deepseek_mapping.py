"""DeepSeek-V2 / V3 teachers: multi-latent attention, dense first layers, routed + shared experts, and (V3) sigmoid
routing with a score-correction bias and group-limited top-k.

Every MLA projection maps one-to-one (megatron-core keeps HF's [no-rope, rope] split per head and the
[latent, rope] split of the KV down-projection); the q/kv RMSNorms are stored under Transformer Engine's fused
names. megatron-core's MLA always de-interleaves the rotary half before rotating, which is V2's complex-pair
rotary and V3's `rope_interleave=True`. Routing is mapped only where megatron-core computes the same experts and
weights; otherwise the converter refuses and says why.
"""

from __future__ import annotations

import torch.nn.functional as F

from megatron_m2d.convert import dense_mapping, moe_mapping
from megatron_m2d.convert.mapping import Rows, Same, Spec
from megatron_m2d.errors import M2DError

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def _routing(config) -> dict:
    k, groups, topk_group = config.num_experts_per_tok, config.n_group or 1, config.topk_group or 1
    if config.model_type == "deepseek_v2":
        method = getattr(config, "topk_method", "greedy")
        # V2's group score is the group's best expert; megatron-core sums the group's top (k / topk_group)
        if method == "group_limited_greedy" and groups > 1 and k // topk_group != 1:
            raise M2DError(f"cannot convert deepseek_v2 to Megatron-Core: group_limited_greedy scores a group by its "
                           f"best expert, megatron-core by the sum of its top {k // topk_group}")
        kwargs = dict(moe_router_score_function="softmax", moe_router_pre_softmax=True)
        grouped = method == "group_limited_greedy" and groups > 1
    else:
        if not getattr(config, "norm_topk_prob", True):
            raise M2DError("cannot convert deepseek_v3 with norm_topk_prob=False: megatron-core's sigmoid router "
                           "always normalises the selected weights")
        if groups > 1 and k // topk_group != 2:
            raise M2DError(f"cannot convert deepseek_v3 to Megatron-Core: it scores a group by its top-2 experts, "
                           f"megatron-core by its top {k // topk_group} (num_experts_per_tok / topk_group)")
        if not getattr(config, "rope_interleave", True):
            raise M2DError("cannot convert deepseek_v3 with rope_interleave=False: megatron-core's MLA rotates "
                           "the interleaved layout")
        kwargs = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                      moe_router_bias_update_rate=0.0)  # a teacher: the correction bias stays as trained
        grouped = groups > 1
    if grouped:
        kwargs.update(moe_router_num_groups=groups, moe_router_group_topk=topk_group)
    if (config.routed_scaling_factor or 1.0) != 1.0:
        kwargs["moe_router_topk_scaling_factor"] = float(config.routed_scaling_factor)
    return kwargs


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return dict(rope_type="rope", rotary_base=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000))))
    if kind != "yarn":
        raise M2DError(f"cannot convert {config.model_type} with {kind!r} rotary scaling (megatron-core MLA: "
                       "default or yarn)")
    return dict(rope_type="yarn", rotary_base=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000))),
                rotary_scaling_factor=float(rope["factor"]), mscale=float(rope.get("mscale", 1.0)),
                mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                beta_fast=float(rope.get("beta_fast", 32)), beta_slow=float(rope.get("beta_slow", 1)))


def moe_layers(config) -> list[int]:
    first_dense, every = config.first_k_dense_replace or 0, getattr(config, "moe_layer_freq", 1) or 1
    return [i for i in range(config.num_hidden_layers) if i >= first_dense and i % every == 0]


def config_kwargs(config) -> dict:
    """MLATransformerConfig fields of a DeepSeek-V2/V3 HF config."""
    if config.hidden_act != "silu":
        raise M2DError(f"activation {config.hidden_act} is not SwiGLU; no Megatron mapping")
    return dict(
        multi_latent_attention=True, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank, qk_head_dim=config.qk_nope_head_dim,
        qk_pos_emb_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim, kv_channels=config.v_head_dim,
        qk_layernorm=True, ffn_hidden_size=config.intermediate_size, normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, num_moe_experts=config.n_routed_experts,
        moe_router_topk=config.num_experts_per_tok, moe_ffn_hidden_size=config.moe_intermediate_size,
        moe_shared_expert_intermediate_size=config.n_shared_experts * config.moe_intermediate_size,
        moe_layer_freq=moe_mapping.layer_freq(moe_layers(config), config.num_hidden_layers),
        moe_router_dtype="fp32",  # HF routes in fp32
        **moe_mapping.TEACHER_ROUTING, **_routing(config), **_rope(config))


def _attention_table(config, layer: int) -> dict[str, Spec]:
    m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    a, attn = m + "self_attention.", h + "self_attn."
    table: dict[str, Spec] = dense_mapping.norms_table(layer) | {
        a + "linear_kv_down_proj.weight": Same(attn + "kv_a_proj_with_mqa.weight"),
        a + "kv_layernorm.weight": Same(attn + "kv_a_layernorm.weight"),
        a + "linear_kv_up_proj.weight": Same(attn + "kv_b_proj.weight"),
        a + "linear_proj.weight": Same(attn + "o_proj.weight"),
    }
    if config.q_lora_rank is None:
        table[a + "linear_q_proj.weight"] = Same(attn + "q_proj.weight")
    else:
        table |= {a + "linear_q_down_proj.weight": Same(attn + "q_a_proj.weight"),
                  a + "q_layernorm.weight": Same(attn + "q_a_layernorm.weight"),
                  a + "linear_q_up_proj.weight": Same(attn + "q_b_proj.weight")}
    return table


def _moe_table(config, layer: int) -> dict[str, Spec]:
    m, h = f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}.mlp."
    table: dict[str, Spec] = {m + "router.weight": Same(h + "gate.weight")}
    if config.model_type == "deepseek_v3":
        table[m + "router.expert_bias"] = Same(h + "gate.e_score_correction_bias")
    for e in range(config.n_routed_experts):
        expert = f"{h}experts.{e}."
        table[f"{m}experts.local_experts.{e}.linear_fc1.weight"] = Rows((expert + "gate_proj.weight",
                                                                         expert + "up_proj.weight"))
        table[f"{m}experts.local_experts.{e}.linear_fc2.weight"] = Same(expert + "down_proj.weight")
    return table | dense_mapping.gated_mlp_table(m + "shared_experts.", h + "shared_experts.")


def table(config, vocab_rows: int | None = None) -> dict[str, Spec]:
    moe = set(moe_layers(config))
    out = dense_mapping.global_table(config, vocab_rows or config.vocab_size)
    for i in range(config.num_hidden_layers):
        out |= _attention_table(config, i)
        out |= _moe_table(config, i) if i in moe else dense_mapping.gated_mlp_table(f"decoder.layers.{i}.mlp.",
                                                                                      f"model.layers.{i}.mlp.")
    return out
