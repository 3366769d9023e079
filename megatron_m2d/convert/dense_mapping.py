"""HF <-> Megatron-Core names and layouts for the dense students (Qwen3, Qwen2, Llama, Mistral).

Pure tensor bookkeeping, no Megatron import: the same table serves the converter and its tests. Megatron's
local layer spec (no Transformer Engine) names are used; its fused QKV holds, per query group, the group's query
heads followed by one key and one value head, and its fc1 holds gate rows then up rows.
"""

from __future__ import annotations

import torch

from megatron_m2d.errors import M2DError

# model_type -> (q/k RMSNorm per head, q/k/v biases)
DENSE_TYPES = {"qwen3": (True, False), "qwen2": (False, True), "llama": (False, False), "mistral": (False, False)}

# per-layer one-to-one tensors: Megatron name -> HF name
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QK_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def check_supported(config) -> tuple[bool, bool]:
    if config.model_type not in DENSE_TYPES:
        raise M2DError(f"no Megatron mapping for dense model type {config.model_type!r} "
                       f"(supported: {', '.join(DENSE_TYPES)})")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise M2DError("sliding-window attention has no equivalent in the Megatron local spec; refusing rather "
                       "than converting to a different model")
    return DENSE_TYPES[config.model_type]


def _groups(config) -> tuple[int, int, int]:
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, groups, head_dim


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config) -> torch.Tensor:
    """[q; k; v] (HF, by projection) -> Megatron's per-group interleave. Works for weights and biases."""
    heads, groups, d = _groups(config)
    tail = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *tail)
    return torch.cat([q, k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, groups, d = _groups(config)
    tail = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads // groups + 2) * d, *tail)
    q, k, v = per_group.split([heads // groups * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_to_megatron(hf: dict[str, torch.Tensor], config, mlp: bool = True) -> dict[str, torch.Tensor]:
    """`mlp=False` maps everything but the FFN (the MoE teachers map their MoE blocks themselves)."""
    qk_norm, qkv_bias = check_supported(config)
    out = {m: hf[h] for m, h in GLOBAL_RENAMES.items() if h in hf}
    if getattr(config, "tie_word_embeddings", False):  # Megatron shares the embedding as its output layer
        out.pop("output_layer.weight", None)
    for i in range(config.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for mega, name in LAYER_RENAMES.items():
            if (mega in QK_NORMS and not qk_norm) or (mega.startswith("mlp.") and not mlp):
                continue
            out[m + mega] = hf[h + name]
        attn = h + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], config)
        if qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
                hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], config)
        if mlp:
            out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
    return out


def megatron_to_hf(mega: dict[str, torch.Tensor], config, mlp: bool = True) -> dict[str, torch.Tensor]:
    qk_norm, qkv_bias = check_supported(config)
    out = {h: mega[m] for m, h in GLOBAL_RENAMES.items() if m in mega}
    if getattr(config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    for i in range(config.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for name, hf_name in LAYER_RENAMES.items():
            if m + name in mega:
                out[h + hf_name] = mega[m + name]
        attn = h + "self_attn."
        q, k, v = split_qkv(mega[m + "self_attention.linear_qkv.weight"], config)
        out.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v})
        if qkv_bias:
            q, k, v = split_qkv(mega[m + "self_attention.linear_qkv.bias"], config)
            out.update({attn + "q_proj.bias": q, attn + "k_proj.bias": k, attn + "v_proj.bias": v})
        if mlp:
            gate, up = mega[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}
