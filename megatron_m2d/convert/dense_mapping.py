"""HF <-> Megatron-Core table for the dense students (Qwen3, Qwen2, Llama, Mistral) and the attention, norms and
embeddings that the MoE teachers share with their dense twin.

Names are those of Megatron's layer specs (local and Transformer Engine give the same checkpoint keys): the
fused QKV holds, per query group, the group's query heads then one key and one value head; fc1 holds the gate
rows then the up rows.
"""

from __future__ import annotations

import torch.nn.functional as F

from megatron_m2d.convert.mapping import QKV, PaddedRows, Rows, Same, Spec
from megatron_m2d.errors import M2DError

# model_type -> (q/k RMSNorm per head, q/k/v biases)
DENSE_TYPES = {"qwen3": (True, False), "qwen2": (False, True), "llama": (False, False), "mistral": (False, False)}


def check_supported(config) -> tuple[bool, bool]:
    if config.model_type not in DENSE_TYPES:
        raise M2DError(f"no Megatron mapping for dense model type {config.model_type!r} "
                       f"(supported: {', '.join(DENSE_TYPES)})")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise M2DError("sliding-window attention on every layer is not expressed by this converter's Megatron "
                       "config; refusing rather than converting to a different model")
    return DENSE_TYPES[config.model_type]


def config_kwargs(config) -> dict:
    """TransformerConfig fields of a HF dense decoder (a student, or a MoE teacher's dense twin)."""
    qk_norm, qkv_bias = check_supported(config)
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


def padded_vocab(config, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so that it splits evenly over TP ranks; we pad to a multiple of
    `divisible_by` only (not times TP, as Megatron-LM does) so one checkpoint serves every TP size dividing it."""
    return -(-config.vocab_size // divisible_by) * divisible_by


def global_table(config, vocab_rows: int) -> dict[str, Spec]:
    table: dict[str, Spec] = {"embedding.word_embeddings.weight": PaddedRows("model.embed_tokens.weight", vocab_rows),
                              "decoder.final_layernorm.weight": Same("model.norm.weight")}
    if not getattr(config, "tie_word_embeddings", False):  # tied: Megatron's output layer is the embedding
        table["output_layer.weight"] = PaddedRows("lm_head.weight", vocab_rows)
    return table


def norms_table(layer: int) -> dict[str, Spec]:
    """A decoder layer's two RMSNorms (every family here names them the same)."""
    m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    return {m + "input_layernorm.weight": Same(h + "input_layernorm.weight"),
            m + "pre_mlp_layernorm.weight": Same(h + "post_attention_layernorm.weight")}


def attention_table(config, layer: int) -> dict[str, Spec]:
    """The layer's norms and its GQA attention."""
    qk_norm, qkv_bias = check_supported(config)
    m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    attn = h + "self_attn."
    table: dict[str, Spec] = norms_table(layer) | {
        m + "self_attention.linear_qkv.weight": QKV(*(attn + f"{p}_proj.weight" for p in "qkv")),
        m + "self_attention.linear_proj.weight": Same(attn + "o_proj.weight"),
    }
    if qkv_bias:
        table[m + "self_attention.linear_qkv.bias"] = QKV(*(attn + f"{p}_proj.bias" for p in "qkv"))
    if qk_norm:
        table[m + "self_attention.q_layernorm.weight"] = Same(attn + "q_norm.weight")
        table[m + "self_attention.k_layernorm.weight"] = Same(attn + "k_norm.weight")
    return table


def gated_mlp_table(megatron_prefix: str, hf_prefix: str) -> dict[str, Spec]:
    """A SwiGLU MLP: gate_proj/up_proj/down_proj -> linear_fc1 (gate rows, then up rows) / linear_fc2."""
    return {megatron_prefix + "linear_fc1.weight": Rows((hf_prefix + "gate_proj.weight", hf_prefix + "up_proj.weight")),
            megatron_prefix + "linear_fc2.weight": Same(hf_prefix + "down_proj.weight")}


def table(config, vocab_rows: int | None = None) -> dict[str, Spec]:
    """Megatron parameter name -> spec, for a whole dense student."""
    out = global_table(config, vocab_rows or config.vocab_size)
    for i in range(config.num_hidden_layers):
        out |= attention_table(config, i)
        out |= gated_mlp_table(f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp.")
    return out
