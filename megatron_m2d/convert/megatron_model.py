"""Build the Megatron-Core GPT model of a HF dense student or MoE teacher (imports megatron-core; never offline).

Transformer Engine's layer spec when TE imports, the local spec otherwise; both give the same checkpoint keys
(the local spec renames its norms to TE's fused names, and for MoE layers we keep `pre_mlp_layernorm` separate,
as TE does), so one checkpoint loads in either. megatron-core 0.19 marks GPTModel deprecated in favour of
HybridModel; GPTModel still builds there and is what this module uses (HybridModel splits attention and MLP into
separate layers, so its checkpoint keys differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_m2d.convert import dense_mapping, moe_mapping
from megatron_m2d.convert.parallel import ParallelSizes
from megatron_m2d.errors import M2DError


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match the CUDA/torch it finds
        return False
    return True


def _dense_kwargs(config) -> dict:
    """TransformerConfig fields of a HF dense decoder (Qwen3/Qwen2/Llama/Mistral, or a MoE's dense twin)."""
    qk_norm, qkv_bias = dense_mapping.check_supported(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.hidden_act != "silu":
        raise M2DError(f"activation {config.hidden_act} is not SwiGLU; no Megatron mapping")
    return dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
                kv_channels=head_dim, ffn_hidden_size=config.intermediate_size, normalization="RMSNorm",
                layernorm_epsilon=config.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
                add_bias_linear=False, add_qkv_bias=qkv_bias, qk_layernorm=qk_norm, hidden_dropout=0.0,
                attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
                apply_rope_fusion=False, persist_layer_norm=False)


def transformer_config_kwargs(config) -> dict:
    """TransformerConfig fields equivalent to a HF config (dense student or supported MoE teacher)."""
    if moe_mapping.is_moe(config):
        _, twin = moe_mapping.check_supported(config)
        return {**_dense_kwargs(twin), **moe_mapping.moe_config_kwargs(config)}
    return _dense_kwargs(config)


def _keep_moe_pre_mlp_norm_separate(block_spec) -> None:
    """The local spec stores every layer's pre-MLP norm under TE's fused fc1 name; TE's MoE layers keep a
    separate `pre_mlp_layernorm`. Align the local MoE layers with TE so checkpoints load in either spec."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in block_spec.layer_specs:
        keys = getattr(layer.submodules, "sharded_state_dict_keys_map", None)
        if keys and layer.submodules.mlp.module is MoELayer:
            layer.submodules.sharded_state_dict_keys_map = {k: v for k, v in keys.items()
                                                            if k != "pre_mlp_layernorm."}


def build_gpt_model(config, params_dtype: torch.dtype = torch.float32, parallel: ParallelSizes | None = None,
                    vocab_rows: int | None = None, vp_stage: int | None = None, parallel_output: bool = True,
                    use_te: bool | None = None, use_cpu_initialization: bool = True):
    """The Megatron model (this rank's pipeline stage / virtual stage) of a HF config. Needs megatron-core's
    parallel state initialised with the sizes in `parallel`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        from megatron.core.models.gpt import GPTModel
    except ImportError as e:  # a future megatron-core without GPTModel
        raise M2DError(f"this megatron-core has no GPTModel ({e}); m2d builds GPT-style models with it") from None
    parallel = parallel or ParallelSizes()
    kwargs = transformer_config_kwargs(config)
    transformer = TransformerConfig(**kwargs, **parallel.transformer_config_kwargs("num_moe_experts" in kwargs),
                                    params_dtype=params_dtype, pipeline_dtype=params_dtype,
                                    use_cpu_initialization=use_cpu_initialization)
    use_te = te_available() if use_te is None else use_te
    block = get_gpt_decoder_block_spec(transformer, use_transformer_engine=use_te, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    if not use_te:
        _keep_moe_pre_mlp_norm_separate(block)
    rope = getattr(config, "rope_parameters", None) or {}
    return GPTModel(transformer, block, vocab_size=vocab_rows or config.vocab_size,
                    max_sequence_length=config.max_position_embeddings, position_embedding_type="rope",
                    rotary_base=int(rope.get("rope_theta", getattr(config, "rope_theta", 10000))),
                    share_embeddings_and_output_weights=bool(getattr(config, "tie_word_embeddings", False)),
                    parallel_output=parallel_output,
                    pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                    post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                    vp_stage=vp_stage)


def table_for(config, vocab_rows: int | None = None):
    """The family table (Megatron parameter name -> HF spec) of a dense student or MoE teacher."""
    if moe_mapping.is_moe(config):
        return moe_mapping.table(config, vocab_rows)
    return dense_mapping.table(config, vocab_rows)
