"""Tiny checkpoints of every convertible family and the logit/round-trip checks the conversion tests share."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_m2d.convert.dense_mapping import DENSE_TYPES
from megatron_m2d.testing.tiny import byte_tokenizer
from tests.megatron_cpu import causal_mask


# (family, config overrides): Qwen2-MoE with a dense layer between MoE layers and its gated shared expert
MOE_CASES = [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}), ("mixtral", {}),
             ("qwen2_moe", {"mlp_only_layers": [0]})]


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
        "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}


def tiny_deepseek(path, model_type, **extra):
    """DeepSeek-V2 (no q compression, softmax) or V3 (q LoRA, sigmoid + correction bias, group-limited top-k):
    3 layers, the first dense; router weights and the correction bias large enough that routing matters."""
    fields = dict(vocab_size=259, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                  first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32, qk_rope_head_dim=8,
                  qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1, max_position_embeddings=256,
                  q_lora_rank=None if model_type == "deepseek_v2" else 48, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**fields, **extra})).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias"):
                tensor.normal_(0.0, 0.5 if name.endswith("weight") else 0.1)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def tiny_gpt_oss(path, **extra):
    """GPT-OSS: biases everywhere, learned sinks, a 4-token sliding window on even layers (shorter than the test
    sequences), yarn rotary, fused interleaved experts; router, sinks and biases large enough to matter."""
    fields = dict(vocab_size=259, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                  sliding_window=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **{**fields, **extra})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name or "sinks" in name or "bias" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def teacher(tiny, family, path, **extra):
    """A tiny random checkpoint of any convertible family, on disk."""
    if family in DENSE_TYPES:
        return tiny_dense(path, family, **extra)
    if family.startswith("deepseek"):
        return tiny_deepseek(path, family, **extra)
    if family == "gpt_oss":
        return tiny_gpt_oss(path, **extra)
    return tiny(family, **extra)


def tiny_dense(path, model_type, **extra):
    fields = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    if model_type == "mistral":
        fields["sliding_window"] = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**fields, **extra})).eval()
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def safetensors_dir(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def hf_logits(path, ids) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def megatron_logits(checkpoint, ids) -> torch.Tensor:
    """Single process (TP1/PP1/EP1), through the provider config, as distillation builds it."""
    from megatron_m2d.convert.provider import load_checkpoint, model_provider

    model = model_provider(checkpoint, params_dtype=torch.float32, parallel_output=False, use_te=False)()
    load_checkpoint(model, checkpoint)
    model.eval()
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids),
                     attention_mask=causal_mask(ids.shape[1]))


def assert_logits_match(got, expected, atol):
    """Megatron pads the vocabulary (259 -> 384 rows): the real rows must match; padded rows are zero logits."""
    assert got.shape[:-1] == expected.shape[:-1] and got.shape[-1] >= expected.shape[-1]
    assert torch.allclose(got[..., :expected.shape[-1]], expected, atol=atol, rtol=0)


def assert_round_trip(hf, tmp_path):
    """HF -> streamed Megatron checkpoint -> HF gives the same tensor names, values and dtypes. Returns the
    Megatron checkpoint and the exported directory."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    checkpoint = hf_to_megatron_checkpoint(hf, tmp_path / "megatron")
    back = megatron_to_hf_checkpoint(checkpoint, tmp_path / "back")
    original, restored = safetensors_dir(hf), safetensors_dir(back)
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) and restored[k].dtype == original[k].dtype for k in original)
    return checkpoint, back


def ids_for(seed, length=16):
    return torch.randint(0, 259, (2, length), generator=torch.Generator().manual_seed(seed))
