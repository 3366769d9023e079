"""Qwen1.5/Qwen2-MoE: softmax top-k router (usually not renormalised) plus one shared expert behind a
sigmoid gate."""

from megatron_m2d.families.base import Family, _sparse_step_layers
from megatron_m2d.families.parts import SharedExpert

QWEN2_MOE = Family(
    model_type="qwen2_moe",
    moe_block="mlp",
    dense_model_type="qwen2",
    shared=SharedExpert(),
    moe_layers_of=_sparse_step_layers,
    moe_config_fields=("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                       "decoder_sparse_step", "mlp_only_layers", "output_router_logits", "router_aux_loss_coef",
                       "shared_expert_intermediate_size", "qkv_bias"),
)
