"""DeepSeek-V2 / V2-Lite and DeepSeek-V3: routed experts plus always-on shared experts (added unscaled), the first
`first_k_dense_replace` layers dense, multi-latent attention copied untouched.

Routing is transformers' own router module, which returns the weights it applies and the experts it selects:
- V2: softmax over all experts, top-k by `topk_method` (greedy, or group_limited_greedy: top `topk_group` groups
  by their best expert), weights = the softmax probabilities times `routed_scaling_factor`. transformers' V2 router
  never renormalises (it ignores `norm_topk_prob`), so neither do we.
- V3: sigmoid scores; `e_score_correction_bias` is added for the choice only (groups scored by their top-2); the
  weights are the selected sigmoid scores, renormalised when `norm_topk_prob`, times `routed_scaling_factor`.
  The paper's p_t for a sigmoid router is the sigmoid score (the probability the router assigns the expert).
The student is the family's own class with every layer dense (`first_k_dense_replace = num_hidden_layers`), so
every runtime that loads DeepSeek loads it, MLA included.
"""

from megatron_m2d.errors import M2DError
from megatron_m2d.families.base import Family
from megatron_m2d.families.parts import SharedExpert, sigmoid_probs

def moe_layers(config) -> list[int]:
    """transformers builds a MoE block in every layer from `first_k_dense_replace` on (no moe_layer_freq)."""
    if (getattr(config, "moe_layer_freq", 1) or 1) != 1:
        raise M2DError(f"{config.model_type} with moe_layer_freq {config.moe_layer_freq}: transformers' "
                       "DeepSeek classes put a MoE block in every layer after first_k_dense_replace")
    return list(range(config.first_k_dense_replace or 0, config.num_hidden_layers))


def every_layer_dense(config) -> dict:
    """The routed-expert fields stay (runtimes such as vLLM read them) but no layer builds a MoE block."""
    return {"first_k_dense_replace": config.num_hidden_layers}


SHARED = SharedExpert(gate_proj="shared_experts.gate_proj.weight", up_proj="shared_experts.up_proj.weight",
                      down_proj="shared_experts.down_proj.weight", gate=None,
                      width=lambda config: (config.n_shared_experts or 0) * config.moe_intermediate_size)

DEEPSEEK_V2 = Family(
    model_type="deepseek_v2",
    moe_block="mlp",
    dense_model_type="deepseek_v2",
    num_experts_field="n_routed_experts",
    renormalizes_of=lambda config: False,
    shared=SHARED,
    moe_layers_of=moe_layers,
    all_dense=every_layer_dense,
)

DEEPSEEK_V3 = Family(
    model_type="deepseek_v3",
    moe_block="mlp",
    dense_model_type="deepseek_v3",
    num_experts_field="n_routed_experts",
    probabilities=sigmoid_probs,
    shared=SHARED,
    moe_layers_of=moe_layers,
    all_dense=every_layer_dense,
)
