"""Build the Megatron-Core GPT model of a HF dense student or MoE teacher (imports megatron-core; never offline).

Transformer Engine's layer spec when TE imports, the local spec otherwise; both give the same checkpoint keys
(the local spec renames its norms to TE's fused names, and for MoE layers we keep `pre_mlp_layernorm` separate,
as TE does), so one checkpoint loads in either. megatron-core 0.19 marks GPTModel deprecated in favour of
HybridModel; GPTModel still builds there and is what this module uses (HybridModel splits attention and MLP into
separate layers, so its checkpoint keys differ).
"""

from __future__ import annotations

import torch

from megatron_m2d.convert import deepseek_mapping, dense_mapping, gpt_oss_mapping, moe_mapping
from megatron_m2d.convert.parallel import ParallelSizes
from megatron_m2d.errors import M2DError


def megatron_core_version() -> tuple[int, int]:
    from megatron.core import __version__

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match the CUDA/torch it finds
        return False
    return True


def mapping_module(config):
    """The family's mapping module: `config_kwargs(config)` (TransformerConfig fields), `table(config,
    vocab_rows)` (Megatron parameter -> HF spec), and `rotary(config)` where GPTModel's plain rope does not apply."""
    if config.model_type in deepseek_mapping.MODEL_TYPES:
        return deepseek_mapping
    if config.model_type == gpt_oss_mapping.MODEL_TYPE:
        return gpt_oss_mapping
    return moe_mapping if moe_mapping.is_moe(config) else dense_mapping


def transformer_config_kwargs(config) -> dict:
    """TransformerConfig fields equivalent to a HF config (dense student or supported MoE teacher)."""
    return mapping_module(config).config_kwargs(config)


def table_for(config, vocab_rows: int | None = None):
    """The family table (Megatron parameter name -> HF spec) of a dense student or MoE teacher."""
    return mapping_module(config).table(config, vocab_rows)


def _module_of(spec):
    """A layer spec's module class: a ModuleSpec's `module`, or the class a functools.partial wraps (0.19)."""
    return getattr(spec, "module", None) or getattr(spec, "func", None)


def _submodules_of(spec):
    return getattr(spec, "submodules", None) or getattr(spec, "keywords", {}).get("submodules")


def _align_local_keys_with_te(block_spec, transformer) -> None:
    """Store each local-spec layer's norms under the names Transformer Engine's spec gives them, so one
    checkpoint loads in either: TE fuses a norm into the linear that follows it (attention QKV, a dense fc1, MLA's
    q/kv up-projections) but keeps MoE layers' pre-MLP norm and MLA's input norm separate. megatron-core's local
    spec maps only the first two, and maps a MoE layer's pre-MLP norm as if it were fused."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megatron_m2d.convert.mla_attention import MLACoreAttention

    for layer in block_spec.layer_specs:
        sub = layer.submodules
        keys = dict(getattr(sub, "sharded_state_dict_keys_map", None) or {})
        if _module_of(sub.self_attention) is MLASelfAttention:
            attention = _submodules_of(sub.self_attention)
            attention.core_attention = MLACoreAttention  # local MLA attention (see there)
            if transformer.q_lora_rank is None:  # no q compression, so no q norm (0.19 rejects an unused one)
                attention.q_layernorm = IdentityOp
            keys.pop("input_layernorm.", None)
            keys |= {"self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
                     "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_"}
        if _module_of(sub.mlp) is MoELayer:
            keys.pop("pre_mlp_layernorm.", None)
        else:
            keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        sub.sharded_state_dict_keys_map = keys


def _correct_mla_te_flag() -> None:
    """megatron-core 0.16.1 sets multi_latent_attention.HAVE_TE whenever its TE extension module imports, which
    it does without Transformer Engine (TE stood in by a MagicMock) once nvidia-modelopt is installed; MLA's
    constructor then calls isinstance(x, <MagicMock>). Setting the flag to the truth (no TE) is all it needs."""
    from megatron.core.transformer import multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not te_available():
        mla.HAVE_TE = False


def _rotary(config, kwargs) -> dict:
    family = mapping_module(config)
    if hasattr(family, "rotary"):
        return family.rotary(config)
    rope = getattr(config, "rope_parameters", None) or {}
    base = kwargs.get("rotary_base") or rope.get("rope_theta", getattr(config, "rope_theta", 10000))
    return dict(position_embedding_type="rope", rotary_base=base, config_attributes={})


def build_gpt_model(config, params_dtype: torch.dtype = torch.float32, parallel: ParallelSizes | None = None,
                    vocab_rows: int | None = None, vp_stage: int | None = None, parallel_output: bool = True,
                    use_te: bool | None = None, moe_grouped_gemm: bool | None = None,
                    use_cpu_initialization: bool = True, config_overrides: dict | None = None):
    """The Megatron model (this rank's pipeline stage / virtual stage) of a HF config. Needs megatron-core's
    parallel state initialised with the sizes in `parallel`. Experts are TE's grouped GEMM when TE is used,
    sequential otherwise (megatron-core stores both under the same checkpoint keys). `config_overrides`:
    TransformerConfig fields set over those the HF config and `parallel` give (a training run's settings)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    try:
        from megatron.core.models.gpt import GPTModel
    except ImportError as e:  # a future megatron-core without GPTModel
        raise M2DError(f"this megatron-core has no GPTModel ({e}); m2d builds GPT-style models with it") from None
    parallel = parallel or ParallelSizes()
    kwargs = transformer_config_kwargs(config)
    use_te = te_available() if use_te is None else use_te
    moe = "num_moe_experts" in kwargs
    grouped = (use_te and moe) if moe_grouped_gemm is None else moe_grouped_gemm
    if grouped and not use_te:  # the local alternative, GroupedMLP, needs the separate grouped_gemm package
        raise M2DError("grouped-GEMM experts need Transformer Engine (TEGroupedMLP); use sequential experts")
    if not use_te and kwargs.get("multi_latent_attention") and kwargs["q_lora_rank"] is None \
            and megatron_core_version() >= (0, 19):
        raise M2DError("megatron-core >= 0.19 builds MLA without q compression (DeepSeek-V2/V2-Lite) in the local "
                       "spec only with a fused norm+linear q projection, which it has only with Transformer Engine; "
                       "install TE or use megatron-core 0.16-0.18")
    if kwargs.get("activation_func") == "quick_gelu":  # named by the pure mapping modules
        from megatron.core.activations import quick_gelu

        kwargs["activation_func"] = quick_gelu
    config_class = MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig
    fields = dict(**kwargs, **parallel.transformer_config_kwargs(moe), moe_grouped_gemm=grouped,
                  params_dtype=params_dtype, pipeline_dtype=params_dtype,
                  transformer_impl="transformer_engine" if use_te else "local",  # 0.19 builds MLA by it
                  use_cpu_initialization=use_cpu_initialization)
    transformer = config_class(**{**fields, **(config_overrides or {})})
    block = get_gpt_decoder_block_spec(transformer, use_transformer_engine=use_te, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    if not use_te:
        _align_local_keys_with_te(block, transformer)
        if kwargs.get("multi_latent_attention"):
            _correct_mla_te_flag()
    rotary = _rotary(config, kwargs)
    for name, value in rotary["config_attributes"].items():  # GPTModel reads its yarn settings off the config
        setattr(transformer, name, value)
    return GPTModel(transformer, block, vocab_size=vocab_rows or config.vocab_size,
                    max_sequence_length=config.max_position_embeddings,
                    position_embedding_type=rotary["position_embedding_type"], rotary_base=rotary["rotary_base"],
                    share_embeddings_and_output_weights=bool(getattr(config, "tie_word_embeddings", False)),
                    parallel_output=parallel_output,
                    pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                    post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                    vp_stage=vp_stage)

