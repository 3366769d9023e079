"""The dense export: a complete HF directory, both on-disk expert layouts, sharding, the plan and model card."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megatron_m2d.calibration.inspect import format_table, inspect_stats
from megatron_m2d.calibration.run import calibrate
from megatron_m2d.densification.run import densify
from megatron_m2d.families import family_of
from tests.conftest import FAMILIES


def dense_tensors(path):
    tensors = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_a_complete_hf_directory(family, tiny, text_dir, tmp_path):
    teacher = tiny(family)
    top_k = family_of(AutoConfig.from_pretrained(teacher)).top_k(AutoConfig.from_pretrained(teacher))
    result = densify(teacher, tmp_path / "dense", "gld_reap", select=top_k + 2, grouping="dominant_expert",
                     scaling="proportional", data=str(text_dir), progress=False,
                     calibration=dict(tokens=512, seq_len=64))
    out = result.path
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "m2d_plan.json",
            "README.md", "model.safetensors.index.json", "m2d_stats"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(dense_tensors(out))
    config = json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)  # no custom code: transformers' own class
    assert "auto_map" not in config and "quantization_config" not in config
    if result.plan["student"]["layout"] == "dense":  # a dense class, or the family's own with every layer dense
        assert not any("expert" in name for name, _ in model.named_modules())
        if "expert" in "".join(config):
            assert config["first_k_dense_replace"] == config["num_hidden_layers"], config
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Fair is foul", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    card = (out / "README.md").read_text()
    # the teacher by name, never by the absolute path it had on the writer's machine
    assert "gld_reap" in card and f"base_model: {teacher.name}" in card and str(teacher) not in card
    assert "512 tokens" in card
    plan = json.loads((out / "m2d_plan.json").read_text())
    assert plan["method"]["grouping"] == "dominant_expert" and plan["calibration"]["tokens"] == 512
    assert not list(tmp_path.glob(".dense*"))  # no temporary sibling left


def fused_copy(per_expert, tmp_path):
    """The same model with experts stored fused on disk ([E, 2I, H] and [E, H, I]), as some hub repos do."""
    model = AutoModelForCausalLM.from_pretrained(per_expert)
    out = tmp_path / "fused"
    out.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(per_expert / name, out / name)
    return out


def test_fused_and_per_expert_layouts_give_identical_results(tiny, text_dir, tmp_path):
    per_expert = tiny("qwen3_moe")
    fused = fused_copy(per_expert, tmp_path)
    common = dict(select=4, grouping="weight_cluster", progress=False)
    stats_a = calibrate(per_expert, str(text_dir), tmp_path / "sa", tokens=512, seq_len=64, gram=True, progress=False)
    stats_b = calibrate(fused, str(text_dir), tmp_path / "sb", tokens=512, seq_len=64, gram=True, progress=False)
    for layer in stats_a.moe_layers:
        for name, value in stats_a.layer(layer).sums.items():
            assert torch.equal(stats_b.layer(layer).sums[name], value), name
    a = densify(per_expert, tmp_path / "a", "gld_reap", stats=stats_a.path, **common)
    b = densify(fused, tmp_path / "b", "gld_reap", stats=stats_b.path, **common)
    assert a.plan["layers"] == b.plan["layers"]
    ta, tb = dense_tensors(a.path), dense_tensors(b.path)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_small_shards_are_indexed_and_load(tiny, text_dir, tmp_path):
    teacher = tiny("mixtral")
    out = densify(teacher, tmp_path / "dense", "reap", data=str(text_dir), progress=False, max_shard_bytes=60_000,
                  calibration=dict(tokens=256, seq_len=64)).path
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bf16_teacher_gives_bf16_student(tiny, text_dir, tmp_path):
    teacher = tiny("qwen3_moe", dtype=torch.bfloat16)
    out = densify(teacher, tmp_path / "dense", "selection_freq", data=str(text_dir), progress=False,
                  calibration=dict(tokens=256, seq_len=64)).path
    assert {t.dtype for t in dense_tensors(out).values()} == {torch.bfloat16}


def test_inspect_summarises_and_plots(tiny, text_dir, tmp_path):
    teacher = tiny("olmoe", layers=3)
    stats = calibrate(teacher, str(text_dir), tmp_path / "s", tokens=512, seq_len=64, progress=False)
    rows = inspect_stats(stats.path, tmp_path / "heat.png", "conditional_prob")
    assert [r["layer"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert 0 < row["entropy"] <= 1 and row["tokens"] == 512
        assert row["routed_weight"] < 1  # OLMoE does not renormalise: top-2 of 8 softmax weights sum below 1
    png = (tmp_path / "heat.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "entropy" in format_table(rows).splitlines()[0]
