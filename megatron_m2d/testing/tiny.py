"""Tiny MoE checkpoints of every supported family, built locally in well under a second.

Used by the tests and by the embedded default of the quick start. The tokenizer is byte-level with no merges
(259 ids: 256 bytes + 3 specials), so it needs no training and no download and round-trips any text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|bos|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=SPECIALS[0], pad_token=SPECIALS[1],
                                   bos_token=SPECIALS[2])


VOCAB = 256 + len(SPECIALS)

# MLA in tiny form (DeepSeek): as many key/value heads as query heads, small latent and rotary dims.
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)

# Per family: the config fields that make a small MoE (4-8 experts, top-2). A case may name its model_type (the
# EMO/StdMoE-like shape: 127 routed + 1 always-on shared expert, top-7, expressed by DeepSeek-V2's class).
FAMILY_CONFIGS = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      head_dim=16, intermediate_size=64),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
                      shared_expert_intermediate_size=48, intermediate_size=64),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        intermediate_size=64, first_k_dense_replace=1, q_lora_rank=None, routed_scaling_factor=2.0,
                        topk_method="greedy", **_MLA),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        intermediate_size=64, first_k_dense_replace=1, q_lora_rank=48, routed_scaling_factor=2.5,
                        n_group=2, topk_group=1, norm_topk_prob=True, **_MLA),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=4,
                    max_position_embeddings=4096),
    "emo_like": dict(model_type="deepseek_v2", n_routed_experts=127, num_experts_per_tok=7, moe_intermediate_size=8,
                     n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None, topk_method="greedy", **_MLA),
}
# Router parameters (and biases) drawn large enough that routing is not uniform: transformers' init is std 0.02.
_ROUTER_PARAMS = ("gate.weight", "router.weight", "router.bias", "e_score_correction_bias", "_bias", "sinks")


def tiny_config(model_type: str, layers: int = 2, hidden: int = 64, **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, eos_token_id=256, pad_token_id=257,
                  bos_token_id=258, tie_word_embeddings=False)
    fields.update(FAMILY_CONFIGS.get(model_type, {}))
    fields.update(overrides)
    return AutoConfig.for_model(fields.pop("model_type", model_type), **fields)


def build_tiny_moe(path: str | Path, model_type: str = "qwen3_moe", seed: int = 0, layers: int = 2,
                   hidden: int = 64, dtype: torch.dtype = torch.float32, edit=None, **overrides) -> Path:
    """Save a random tiny MoE with the byte tokenizer at `path`. `edit(model)` may change weights first."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, layers=layers, hidden=hidden, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # transformers' init is tiny (std 0.02); larger weights make routing non-trivial
        for name, param in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(_ROUTER_PARAMS) and "layernorm" not in name and param.is_floating_point():
                param.normal_(0.0, 0.5 if param.dim() == 2 else 0.1)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    path = Path(path)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few of its "
    "experts; a dense model runs one wide feed-forward network for every token. Calibration text shows which "
    "experts matter, and the dense student keeps those. "
)


def write_sample_text(path: str | Path, documents: int = 8, repeat: int = 6) -> Path:
    """A small calibration corpus: `documents` .txt files with varied text."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = SAMPLE_TEXT.split()
    for d in range(documents):
        rotated = " ".join(words[d % len(words):] + words[: d % len(words)])
        (path / f"doc{d:02d}.txt").write_text((rotated + f" Document {d}. ") * repeat)
    return path


def build_moe_on_disk(path: str | Path, model_type: str = "qwen3_moe", seed: int = 0, std: float = 0.02,
                      mxfp4: bool = False, dtype: torch.dtype = torch.float32, **config_fields) -> Path:
    """A random MoE of any size written straight to disk, one shard per decoder layer, without ever holding
    the model in memory (for memory tests: the checkpoint may be larger than what the test allows itself).
    Experts are stored as transformers saves them: per expert, or fused where the family keeps them fused on
    disk (GPT-OSS), then with `mxfp4` as MXFP4 blocks and scales, as GPT-OSS is published."""
    from megatron_m2d.families import FAMILIES

    path = Path(path)
    path.mkdir(parents=True)
    config = tiny_config(model_type, **config_fields)
    config.dtype = dtype  # the checkpoint's own dtype, which from_pretrained(dtype="auto") loads it in
    family = FAMILIES[config.model_type]
    moe_layers = set(family.moe_layers(config))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple] = {}
    for name, tensor in skeleton.state_dict().items():
        parts = name.split(".")
        layer = int(parts[2]) if name.startswith("model.layers.") else None
        if layer in moe_layers and parts[3] == "mlp":  # the MoE block under its on-disk name (Mixtral's)
            name = family.block_key(layer, ".".join(parts[4:]))
        if family.experts.fused_on_disk and mxfp4 and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, columns, rows = tensor.shape
            shapes[name + "_blocks"], shapes[name + "_scales"] = (experts, rows, columns // 32, 16), \
                (experts, rows, columns // 32)
        elif family.experts.fused_on_disk or layer not in moe_layers or ".experts." not in name:
            shapes[name] = tuple(tensor.shape)
        elif name.endswith("experts.gate_up_proj"):
            experts, double_width, hidden = tensor.shape
            for e in range(experts):
                for template in (family.experts.gate, family.experts.up):
                    shapes[family.block_key(layer, template.format(e=e))] = (double_width // 2, hidden)
        elif name.endswith("experts.down_proj"):
            for e in range(tensor.shape[0]):
                shapes[family.block_key(layer, family.experts.down.format(e=e))] = tuple(tensor.shape[1:])
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        group = f"layer{int(parts[2]):04d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(group, []).append(name)
    weight_map = {}
    for number, (group, names) in enumerate(sorted(groups.items()), start=1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=dtype)
            elif name.endswith(("_blocks", "_scales")):  # FP4 codes; exponents near 2^-6
                low, high = (0, 256) if name.endswith("_blocks") else (118, 124)
                tensors[name] = torch.randint(low, high, shapes[name], generator=generator, dtype=torch.uint8)
            else:
                scale = 0.5 if name.endswith("gate.weight") else std
                tensors[name] = (torch.randn(shapes[name], generator=generator) * scale).to(dtype)
        save_file(tensors, path / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in names})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if mxfp4:
        config.quantization_config = {"quant_method": "mxfp4"}
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def with_mxfp4_experts(source: str | Path, path: str | Path, seed: int = 0) -> Path:
    """A copy of the GPT-OSS checkpoint `source` whose expert stacks are stored as GPT-OSS publishes them: MXFP4
    `*_blocks` [E, R, G, 16] and `*_scales` [E, R, G] (random codes, exponents near 2^-4) in place of each
    [E, G*32, R] float stack, and a `quantization_config` saying so."""
    source, path = Path(source), Path(path)
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        from safetensors.torch import load_file

        for name, tensor in load_file(shard).items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                experts, columns, rows = tensor.shape
                tensors[name + "_blocks"] = torch.randint(0, 256, (experts, rows, columns // 32, 16),
                                                          generator=generator, dtype=torch.uint8)
                tensors[name + "_scales"] = torch.randint(119, 125, (experts, rows, columns // 32),
                                                          generator=generator, dtype=torch.uint8)
            else:
                tensors[name] = tensor
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for side in source.iterdir():
        if side.suffix != ".safetensors" and side.name != "config.json" and side.is_file():
            (path / side.name).write_bytes(side.read_bytes())
    return path
