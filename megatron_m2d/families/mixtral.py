"""Mixtral: softmax over the top-k logits (always renormalised); experts w1 (gate), w3 (up), w2 (down)."""

from megatron_m2d.families.base import Family
from megatron_m2d.families.parts import ExpertKeys

MIXTRAL = Family(
    model_type="mixtral",
    moe_block="block_sparse_moe",
    dense_model_type="mistral",
    experts=ExpertKeys(gate="experts.{e}.w1.weight", up="experts.{e}.w3.weight", down="experts.{e}.w2.weight"),
    num_experts_field="num_local_experts",
    width_field="intermediate_size",
    renormalizes_of=lambda config: True,
    moe_config_fields=("num_local_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef",
                       "router_jitter_noise"),
)
