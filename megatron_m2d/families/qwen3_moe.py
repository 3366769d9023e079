"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-k router, renormalised when norm_topk_prob."""

from megatron_m2d.families.base import Family, _sparse_step_layers

QWEN3_MOE = Family(
    model_type="qwen3_moe",
    moe_block="mlp",
    dense_model_type="qwen3",
    moe_layers_of=_sparse_step_layers,
    moe_config_fields=("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                       "decoder_sparse_step", "mlp_only_layers", "output_router_logits", "router_aux_loss_coef"),
)
