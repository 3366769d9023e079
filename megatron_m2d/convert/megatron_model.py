"""Build the Megatron-Core GPT model that holds a dense student (imports megatron-core; never used offline).

Transformer Engine's layer spec when TE is importable, the local spec otherwise. The checkpoint tensors are the
same for both except for names the TE spec fuses (its QKV and fc1 carry their input norm); this module builds
the local spec, whose names `dense_mapping` uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_m2d.convert.dense_mapping import check_supported


def transformer_config_kwargs(config) -> dict:
    """TransformerConfig fields equivalent to a HF dense decoder config (Qwen3/Qwen2/Llama/Mistral)."""
    qk_norm, qkv_bias = check_supported(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.hidden_act != "silu":
        raise ValueError(f"activation {config.hidden_act} is not SwiGLU")
    return dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
                kv_channels=head_dim, ffn_hidden_size=config.intermediate_size, normalization="RMSNorm",
                layernorm_epsilon=config.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
                add_bias_linear=False, add_qkv_bias=qkv_bias, qk_layernorm=qk_norm, hidden_dropout=0.0,
                attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
                apply_rope_fusion=False, persist_layer_norm=False)


def build_gpt_model(config, params_dtype: torch.dtype = torch.float32, use_cpu_initialization: bool = True,
                    parallel_output: bool = True):
    """The Megatron model of a HF dense student, or of a MoE teacher that `moe_mapping` supports."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_m2d.convert import moe_mapping

    if config.model_type in moe_mapping.DENSE_TWIN or config.model_type in moe_mapping.REFUSED:
        _, twin = moe_mapping.check_supported(config)
        kwargs = {**transformer_config_kwargs(twin), **moe_mapping.moe_config_kwargs(config)}
    else:
        kwargs = transformer_config_kwargs(config)
    transformer = TransformerConfig(**kwargs, params_dtype=params_dtype, use_cpu_initialization=use_cpu_initialization)
    spec = get_gpt_layer_local_spec(num_experts=kwargs.get("num_moe_experts"), moe_grouped_gemm=False,
                                    qk_layernorm=kwargs["qk_layernorm"], normalization="RMSNorm")
    rope = getattr(config, "rope_parameters", None) or {}
    return GPTModel(transformer, spec, vocab_size=config.vocab_size,
                    max_sequence_length=config.max_position_embeddings, position_embedding_type="rope",
                    rotary_base=int(rope.get("rope_theta", getattr(config, "rope_theta", 10000))),
                    share_embeddings_and_output_weights=bool(getattr(config, "tie_word_embeddings", False)),
                    parallel_output=parallel_output)
