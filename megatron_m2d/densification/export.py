"""Write the dense student as a HF checkpoint that plain transformers loads, one layer at a time.

Every tensor outside the MoE blocks is copied as it is; each MoE block becomes one dense SwiGLU FFN built from
its plan. Only the kept experts of one layer are ever in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from megatron_m2d.densification.merge import concat_dense, merge_group
from megatron_m2d.densification.plan import LayerPlan, Method
from megatron_m2d.errors import M2DError
from megatron_m2d.families.base import LAYERS, ExpertWeights, Family
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, copy_side_files



def dense_width(family: Family, config, groups: int) -> tuple[str, int]:
    """(layout, FFN width) of the student: k group representatives, plus the shared expert when it is folded
    into a dense class (the one-expert layout keeps the family's own shared expert and gate instead). A family
    whose dense layers share one width (DeepSeek) takes the wider of that and its teacher's dense layers."""
    routed = groups * family.expert_width(config)
    with_shared = routed + family.shared_width(config)
    if family.dense_layout(config, with_shared) == "dense":
        return "dense", family.dense_width(config, with_shared)
    return "one_expert", routed


def zero_pad(tensor: torch.Tensor, shape: tuple) -> torch.Tensor:
    """`tensor` widened to `shape` with zeros. A SwiGLU neuron whose gate row, up row and down column are zero
    contributes act(0) * 0 = 0 to the output, whatever the input: padding a dense FFN is exact."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if any(have > want for have, want in zip(tensor.shape, shape)) or tensor.dim() != len(shape):
        raise M2DError(f"internal error: cannot pad {tuple(tensor.shape)} to {tuple(shape)}")
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def _layer_of(key: str) -> int | None:
    if not key.startswith(LAYERS + "."):
        return None
    return int(key[len(LAYERS) + 1:].split(".", 1)[0])


def build_ffn(ckpt: Checkpoint, family: Family, plan: LayerPlan, method: Method, layout: str,
              dtype: torch.dtype = torch.float32):
    """The dense FFN of one MoE layer, merged in float32, returned in `dtype`."""
    reps = []
    for members, weights in zip(plan.groups, plan.merge_weights):
        experts = [family.read_expert(ckpt, plan.layer, e) for e in members]
        reps.append(merge_group(experts, torch.tensor(weights), method.merge, method.merge_alpha))
        del experts
    shared = family.read_shared(ckpt, plan.layer) if layout == "dense" else None
    shared_scale = plan.shared_scale if plan.shared_scale is not None else 1.0
    return concat_dense(reps, plan.scales, shared, shared_scale, dtype)


def write_dense(ckpt: Checkpoint, family: Family, plans: dict[int, LayerPlan], method: Method, out: Path,
                progress: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write weights, config and tokenizer files of the dense student made by `plans` into `out`."""
    return write_student(ckpt, family, method.groups, lambda layer, layout, dtype: build_ffn(
        ckpt, family, plans[layer], method, layout, dtype), out, progress, max_shard_bytes)


FfnSource = Callable[[int, str, torch.dtype], ExpertWeights]  # (layer, layout, dtype) -> the dense FFN


def write_student(ckpt: Checkpoint, family: Family, groups: int, ffn_for_layer: FfnSource, out: Path,
                  progress: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Every tensor outside the MoE blocks copied, each MoE block replaced by `ffn_for_layer(...)`, as the
    family's dense target class of FFN width k experts (plus a folded shared expert)."""
    config = ckpt.config
    moe_layers = set(family.moe_layers(config))
    layout, width = dense_width(family, config, groups)
    target = family.dense_config(config, width)
    dtype = ckpt.dtype()
    target.dtype = dtype
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(target)
    target.architectures = [type(skeleton).__name__]
    expected = _disk_layout({name: tuple(t.shape) for name, t in skeleton.state_dict().items()}, family, layout)
    tied = bool(getattr(target, "tie_word_embeddings", False))
    if tied:  # the state dict lists the tied head, but checkpoints store only the embedding
        expected.pop("lm_head.weight", None)

    writer = ShardedWriter(out, max_shard_bytes)
    by_layer: dict[int | None, list[str]] = {}
    for key in ckpt.keys():
        by_layer.setdefault(_layer_of(key), []).append(key)
    written: set[str] = set()

    def put(name: str, tensor: torch.Tensor, pad: bool = False) -> None:
        if pad and name in expected:  # the family's one dense width (DeepSeek): zero neurons are exact
            tensor = zero_pad(tensor, expected[name])
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise M2DError(f"internal error: {name} has shape {tuple(tensor.shape)}, the dense model wants "
                           f"{expected[name]}")
        writer.add(name, tensor.to(dtype))
        written.add(name)

    for key in by_layer.get(None, []):
        if tied and key == "lm_head.weight":
            continue
        put(key, ckpt.get(key))
    for layer in tqdm(range(config.num_hidden_layers), desc="densify", unit="layer", disable=not progress):
        is_moe = layer in moe_layers
        block = f"{LAYERS}.{layer}.{family.moe_block}."
        for key in by_layer.get(layer, []):
            if is_moe and key.startswith(block):
                keep_shared = layout == "one_expert" and family.shared and not family.is_routed_expert_key(layer, key) \
                    and key not in family.router_keys(layer)
                if not keep_shared:
                    continue  # replaced by the dense FFN below
            put(key, ckpt.get(key), pad=not is_moe and ".mlp." in key)
        if not is_moe:
            continue
        ffn = ffn_for_layer(layer, layout, dtype)
        if layout == "one_expert":
            for name, tensor in family.one_expert_tensors(layer, ffn, config.hidden_size).items():
                if name in expected:  # a router bias only where the family has one (GPT-OSS)
                    put(name, tensor)
        else:
            names = family.dense_ffn_keys(layer)
            for part in ("gate", "up", "down"):
                put(names[part], getattr(ffn, part), pad=True)
                if getattr(ffn, part + "_bias") is not None:  # the dense class must have FFN biases: checked below
                    put(names[part].removesuffix(".weight") + ".bias", getattr(ffn, part + "_bias"), pad=True)
        ckpt.release()

    for name in sorted(set(expected) - written):
        if name.endswith(".bias"):  # the dense class has a bias the teacher lacked (Qwen2 qkv): zero is exact
            put(name, torch.zeros(expected[name]))
        else:
            raise M2DError(f"internal error: the dense model expects {name}, which the export did not write")
    for name in sorted(written):
        if name not in expected:
            raise M2DError(f"internal error: the export wrote {name}, which the dense model does not have")
    writer.close()
    target.save_pretrained(out)
    copy_side_files(ckpt.path, out)
    return {"layout": layout, "width": width, "architecture": target.architectures[0],
            "dtype": str(dtype).removeprefix("torch."), "bytes": writer.total_bytes}


def _disk_layout(in_memory: dict[str, tuple], family: Family, layout: str) -> dict[str, tuple]:
    """transformers >= 5 keeps experts fused in memory ([E, 2I, H]) but saves them per expert, as the hub and
    vLLM expect; translate the one-expert student's in-memory names to the on-disk ones we write."""
    if layout != "one_expert" or family.experts.fused_on_disk:
        return in_memory
    out = {}
    for name, shape in in_memory.items():
        layer = _layer_of(name)
        if layer is None or f".{layer}.mlp." not in name:
            out[name] = shape
            continue
        keys = family.experts
        if name.endswith("mlp.experts.gate_up_proj"):
            for template in (keys.gate, keys.up):
                out[family.block_key(layer, template.format(e=0))] = (shape[1] // 2, shape[2])
        elif name.endswith("mlp.experts.down_proj"):
            out[family.block_key(layer, keys.down.format(e=0))] = (shape[1], shape[2])
        else:
            out[name.replace(f".{layer}.mlp.", f".{layer}.{family.moe_block}.")] = shape
    return out
