"""The adapter interface reads every expert layout it declares, and refuses what it does not support."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from megatron_m2d.errors import M2DError
from megatron_m2d.families import FAMILIES, family_of
from megatron_m2d.families.base import ExpertKeys
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.testing.tiny import tiny_config

E, I, H = 3, 4, 5


def experts_and_biases():
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g)
    return [dict(gate=t(I, H), up=t(I, H), down=t(H, I), gate_bias=t(I), up_bias=t(I), down_bias=t(H))
            for _ in range(E)]


def write(tmp_path, tensors):
    tiny_config("qwen3_moe", num_experts=E).save_pretrained(tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    return Checkpoint(tmp_path)


@pytest.mark.parametrize("input_major,interleaved", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_layouts_read_back_every_expert(tmp_path, input_major, interleaved):
    """GPT-OSS style (input-major, gate/up interleaved, with biases) and the transformers style (halves)."""
    experts = experts_and_biases()
    family = dataclasses.replace(FAMILIES["qwen3_moe"], experts=ExpertKeys(fused_input_major=input_major,
                                                                             fused_interleaved=interleaved))
    gate_up, gate_up_bias = [], []
    for e in experts:
        if interleaved:
            rows = torch.stack([e["gate"], e["up"]], dim=1).reshape(2 * I, H)
            bias = torch.stack([e["gate_bias"], e["up_bias"]], dim=1).reshape(2 * I)
        else:
            rows, bias = torch.cat([e["gate"], e["up"]]), torch.cat([e["gate_bias"], e["up_bias"]])
        gate_up.append(rows.T if input_major else rows)
        gate_up_bias.append(bias)
    down = [e["down"].T if input_major else e["down"] for e in experts]
    prefix = "model.layers.0.mlp.experts."
    ckpt = write(tmp_path, {prefix + "gate_up_proj": torch.stack(gate_up).contiguous(),
                            prefix + "down_proj": torch.stack(down).contiguous(),
                            prefix + "gate_up_proj_bias": torch.stack(gate_up_bias),
                            prefix + "down_proj_bias": torch.stack([e["down_bias"] for e in experts])})
    for index, expected in enumerate(experts):
        got = family.read_expert(ckpt, 0, index)
        for name, value in expected.items():
            assert torch.equal(getattr(got, name), value), (index, name)


def test_per_expert_biases_are_read_when_present(tmp_path):
    experts = experts_and_biases()
    prefix = "model.layers.0.mlp.experts."
    tensors = {}
    for index, e in enumerate(experts):
        for part in ("gate", "up", "down"):
            tensors[f"{prefix}{index}.{part}_proj.weight"] = e[part]
            tensors[f"{prefix}{index}.{part}_proj.bias"] = e[part + "_bias"]
    got = FAMILIES["qwen3_moe"].read_expert(write(tmp_path, tensors), 0, 2)
    assert torch.equal(got.down_bias, experts[2]["down_bias"]) and torch.equal(got.gate, experts[2]["gate"])


def test_unknown_moe_family_is_refused_by_name():
    with pytest.raises(M2DError, match="unknown MoE family 'granitemoe'"):
        family_of(AutoConfig.for_model("granitemoe"))


def test_moe_layers_follow_the_config():
    config = tiny_config("qwen3_moe", layers=6, mlp_only_layers=[0], decoder_sparse_step=2)
    assert family_of(config).moe_layers(config) == [1, 3, 5]
    assert family_of(tiny_config("mixtral", layers=3)).moe_layers(tiny_config("mixtral", layers=3)) == [0, 1, 2]
