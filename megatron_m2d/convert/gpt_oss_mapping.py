"""GPT-OSS teachers: attention with biases and learned sinks, sliding-window layers alternating with full ones, yarn
rotary (not truncated), a biased router, and experts stored fused: gate_up [E, H, 2I] input-major with gate and
up columns interleaved, clamped SwiGLU `(clamp(up) + 1) * g * sigmoid(1.702 g)` with biases.

megatron-core expresses every piece: learnable softmax offsets (`softmax_type="learnable"`, the sinks), per-layer
`window_attn_skip_freq`, yarn with `correction_range_round_to_int=False`, `add_bias_linear`, quick-GELU with
`glu_linear_offset=1` and `activation_func_clamp_value`. Experts become `local_experts.{e}` (fc1 = gate rows
then up rows), and export stacks them back into the fused tensors.
"""

from __future__ import annotations

from megatron_m2d.convert import dense_mapping, moe_mapping
from megatron_m2d.convert.mapping import QKV, ExpertRow, Same, Spec
from megatron_m2d.errors import M2DError

MODEL_TYPE = "gpt_oss"


def _check(config) -> None:
    if abs(getattr(config, "swiglu_alpha", 1.702) - 1.702) > 1e-6:  # absent before transformers 5.20: 1.702
        raise M2DError("cannot convert GPT-OSS with swiglu_alpha != 1.702: megatron-core's quick-GELU fixes it")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("yarn", "default"):
        raise M2DError(f"cannot convert GPT-OSS with {rope.get('rope_type')!r} rotary scaling (default or yarn)")


def config_kwargs(config) -> dict:
    """TransformerConfig fields of a GPT-OSS HF config."""
    _check(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sliding = [int(kind == "sliding_attention") for kind in config.layer_types]
    return dict(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
        kv_channels=head_dim, ffn_hidden_size=config.intermediate_size, normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps, gated_linear_unit=True,
        activation_func="quick_gelu",  # x * sigmoid(1.702 x), resolved to megatron-core's by build_gpt_model
        glu_linear_offset=1.0, add_bias_linear=True,
        activation_func_clamp_value=float(getattr(config, "swiglu_limit", 7.0)),  # transformers < 5.20: fixed 7
        add_qkv_bias=True, softmax_type="learnable", hidden_dropout=0.0, attention_dropout=0.0,
        # HF's window of W tokens is the query and the W - 1 before it
        window_size=(config.sliding_window - 1, 0) if any(sliding) else None,
        window_attn_skip_freq=sliding if any(sliding) else None,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        num_moe_experts=config.num_local_experts, moe_router_topk=config.num_experts_per_tok,
        moe_ffn_hidden_size=config.intermediate_size, moe_router_pre_softmax=moe_mapping.router_pre_softmax(
            MODEL_TYPE, True, config.num_experts_per_tok, config.num_local_experts),  # top-k, then softmax
        **moe_mapping.TEACHER_ROUTING)


def rotary(config) -> dict:
    """GPTModel's position embedding and the yarn attributes it reads from the TransformerConfig."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    base = float(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") == "default":
        return dict(position_embedding_type="rope", rotary_base=base, config_attributes={})
    return dict(position_embedding_type="yarn", rotary_base=base, config_attributes=dict(
        yarn_rotary_scaling_factor=float(rope["factor"]),
        yarn_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        yarn_beta_fast=float(rope.get("beta_fast", 32)), yarn_beta_slow=float(rope.get("beta_slow", 1)),
        yarn_mscale=1.0, yarn_mscale_all_dim=0.0,  # HF's default attention factor 0.1 ln(factor) + 1
        yarn_correction_range_round_to_int=bool(rope.get("truncate", True))))


def table(config, vocab_rows: int | None = None) -> dict[str, Spec]:
    _check(config)
    out = dense_mapping.global_table(config, vocab_rows or config.vocab_size)
    for i in range(config.num_hidden_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        out |= dense_mapping.norms_table(i) | {
            m + "self_attention.linear_qkv.weight": QKV(*(attn + f"{p}_proj.weight" for p in "qkv")),
            m + "self_attention.linear_qkv.bias": QKV(*(attn + f"{p}_proj.bias" for p in "qkv")),
            m + "self_attention.linear_proj.weight": Same(attn + "o_proj.weight"),
            m + "self_attention.linear_proj.bias": Same(attn + "o_proj.bias"),
            m + "self_attention.core_attention.softmax_offset": Same(attn + "sinks"),
            m + "mlp.router.weight": Same(h + "mlp.router.weight"),
            m + "mlp.router.bias": Same(h + "mlp.router.bias"),
        }
        experts = h + "mlp.experts."
        for e in range(config.num_local_experts):
            x = f"{m}mlp.experts.local_experts.{e}."
            out |= {x + "linear_fc1.weight": ExpertRow(experts + "gate_up_proj", e, "glu_weight"),
                    x + "linear_fc1.bias": ExpertRow(experts + "gate_up_proj_bias", e, "glu_bias"),
                    x + "linear_fc2.weight": ExpertRow(experts + "down_proj", e, "transpose"),
                    x + "linear_fc2.bias": ExpertRow(experts + "down_proj_bias", e, "same")}
    return out
