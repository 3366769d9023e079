"""What a HF checkpoint directory must be before any command computes with it, checked from its config, the
safetensors headers and the file names alone (no weights are read): a config and weights that disagree are
refused here with one line, instead of failing deep inside a layer (or, in transformers, loading with some
weights silently re-initialised)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_m2d.errors import M2DError
from megatron_m2d.io.checkpoint import Checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tekken.json")


def check_hf_model(path: str | Path, moe: bool = False) -> Checkpoint:
    """The opened checkpoint, once its config, layers, tensor shapes and tokenizer files agree; with `moe`, it
    must also be a MoE of a supported family."""
    ckpt = Checkpoint(path)  # config readable, every safetensors header intact, no pickled weights
    config = ckpt.config
    if moe:
        from megatron_m2d.families import family_of

        family_of(config)
    layers = {int(k.split(".")[2]) for k in ckpt.keys() if re.match(r"model\.layers\.\d+\.", k)}
    wanted = getattr(config, "num_hidden_layers", None)
    if isinstance(wanted, int) and layers != set(range(wanted)):
        raise M2DError(f"{path}: config.json says {wanted} layers, the weights hold layers {_ranges(sorted(layers))}")
    _check_shapes(ckpt)
    if not any((ckpt.path / name).is_file() for name in TOKENIZER_FILES):
        raise M2DError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): copy its base model's "
                       "tokenizer files into it")
    return ckpt


def _ranges(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    return f"{numbers[0]}..{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1)) else str(numbers)


def _check_shapes(ckpt: Checkpoint) -> None:
    """Every tensor the config's model has under the same name (all of them for a dense model; attention,
    norms, embeddings and routers for a MoE) and every routed expert has the shape the config implies."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # no memory: shapes only
            skeleton = AutoModelForCausalLM.from_config(ckpt.config)
    except Exception:  # noqa: BLE001 -- a config transformers cannot build is reported by the stage that needs it
        return
    _check_experts(ckpt)
    # routed experts are fused in memory and per expert on disk: counted and checked above instead
    on_disk = _disk_names(ckpt)
    expected = {on_disk(name): tuple(t.shape) for name, t in skeleton.state_dict().items() if ".experts." not in name}
    for key in ckpt.keys():
        if key in expected:
            _compare(ckpt, key, expected[key])
    tied = {"lm_head.weight"} if getattr(ckpt.config, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in expected if not ckpt.has(k) and k not in tied)
    if missing:
        raise M2DError(f"{ckpt.path}: the weights lack {missing[0]} ({len(missing)} tensors its config implies)")


def _disk_names(ckpt: Checkpoint):
    """In-memory name -> on-disk name: a family whose MoE block has another name on disk (Mixtral's
    block_sparse_moe) is renamed by transformers on load; we read the disk."""
    from megatron_m2d.families import FAMILIES

    family = FAMILIES.get(getattr(ckpt.config, "model_type", None))
    if family is None or family.moe_block == "mlp":
        return lambda name: name
    moe_layers = set(family.moe_layers(ckpt.config))

    def rename(name: str) -> str:
        parts = name.split(".")
        if len(parts) > 3 and parts[:2] == ["model", "layers"] and int(parts[2]) in moe_layers and parts[3] == "mlp":
            return ".".join(parts[:3] + [family.moe_block] + parts[4:])
        return name
    return rename


def _compare(ckpt: Checkpoint, key: str, expected: tuple[int, ...]) -> None:
    found = tuple(ckpt.shape(key))
    if found != expected:
        raise M2DError(f"{ckpt.path}: {key} has shape {found}, its config implies {expected}")


def _check_experts(ckpt: Checkpoint) -> None:
    from megatron_m2d.families import FAMILIES

    family = FAMILIES.get(getattr(ckpt.config, "model_type", None))
    if family is None:
        return
    family.check_experts(ckpt)  # the expert count first: the family says it best
    config, keys = ckpt.config, family.experts
    experts, width, hidden = family.num_experts(config), family.expert_width(config), config.hidden_size
    for layer in family.moe_layers(config):
        for e in range(experts):
            gate = family.block_key(layer, keys.gate.format(e=e))
            if not ckpt.has(gate):
                break
            _compare(ckpt, gate, (width, hidden))
            _compare(ckpt, family.block_key(layer, keys.up.format(e=e)), (width, hidden))
            _compare(ckpt, family.block_key(layer, keys.down.format(e=e)), (hidden, width))
        fused, down = family.block_key(layer, keys.fused_gate_up), family.block_key(layer, keys.fused_down)
        if ckpt.has(fused) and ckpt.has(down):
            major = keys.fused_input_major
            _compare(ckpt, fused, (experts, hidden, 2 * width) if major else (experts, 2 * width, hidden))
            _compare(ckpt, down, (experts, width, hidden) if major else (experts, hidden, width))
