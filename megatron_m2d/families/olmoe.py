"""OLMoE: softmax top-k router, norm_topk_prob false. q/k RMSNorm spans the whole projection, which no dense
transformers class has, so the student is an OLMoE with one expert of width k*I and top-1 routing."""

from megatron_m2d.families.base import Family

OLMOE = Family(
    model_type="olmoe",
    moe_block="mlp",
    dense_model_type=None,
    width_field="intermediate_size",
)
