"""Megatron-Core conversion: every supported family round-trips bitwise through a streamed distributed checkpoint,
and the Megatron model built from its provider config gives the HF logits (one process; TP2, EP2 and PP2 in
test_convert_parallel.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_m2d.convert import mapping
from megatron_m2d.convert.dense_mapping import DENSE_TYPES
from megatron_m2d.convert.parallel import ParallelSizes
from megatron_m2d.demo import FIXTURE_MOE
from megatron_m2d.densification.run import densify
from megatron_m2d.errors import M2DError
from tests.convert_models import (MOE_CASES, YARN, assert_logits_match, assert_round_trip, hf_logits, ids_for,
                                  megatron_logits, safetensors_dir, tiny_deepseek, tiny_dense, tiny_gpt_oss)
from tests.megatron_cpu import megatron_cpu  # noqa: F401  (fixture)


# ---- tables, pure ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", list(DENSE_TYPES))
def test_dense_table_round_trip_is_bitwise(model_type, tmp_path):
    from megatron_m2d.convert.megatron_model import table_for

    path = tiny_dense(tmp_path / "hf", model_type)
    hf = safetensors_dir(path)
    config = AutoConfig.from_pretrained(path)
    table = table_for(config, 384)
    assert mapping.hf_sources(table) == set(hf)
    back = mapping.to_hf(mapping.to_megatron(hf, table, config), table, config)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_parallel_sizes_name_what_does_not_divide():
    kwargs = dict(num_layers=6, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  num_moe_experts=6, moe_ffn_hidden_size=32)
    assert ParallelSizes(tp=2, ep=3, pp=2).problems(kwargs, 384) == []
    problems = ParallelSizes(tp=4, ep=4, pp=4, vpp=2).problems(kwargs, 384)
    assert any("--tp 4 does not divide the 2 key/value heads" in p for p in problems)
    assert any("--ep 4 does not divide the 6 experts" in p for p in problems)
    assert any("does not divide the 6 layers" in p for p in problems)
    assert ParallelSizes(tp=3).problems(kwargs, 384)[0] == "--tp 3 does not divide the 4 attention heads"
    assert ParallelSizes(vpp=2).problems(kwargs, 384) == ["--vpp needs --pp > 1 (virtual stages interleave "
                                                          "pipeline ranks)"]


# ---- through a streamed checkpoint, one process -----------------------------------------------------------------

@pytest.mark.parametrize("model_type", list(DENSE_TYPES))
def test_dense_checkpoint_round_trip_and_logits(megatron_cpu, model_type, tmp_path):  # noqa: F811
    """HF -> Megatron checkpoint -> HF is bitwise, and the Megatron model gives HF's logits (fp32 on CPU: the two
    implementations order a few sums differently; 1e-4 on logits of order 1)."""
    hf = tiny_dense(tmp_path / "hf", model_type)
    checkpoint, back = assert_round_trip(hf, tmp_path)
    assert (back / "tokenizer.json").is_file() and "exported from Megatron-Core" in (back / "README.md").read_text()
    ids = ids_for(0)
    assert torch.equal(hf_logits(back, ids), hf_logits(hf, ids))
    assert_logits_match(megatron_logits(checkpoint, ids), hf_logits(hf, ids), atol=1e-4)


@pytest.mark.parametrize("family,extra", MOE_CASES)
def test_moe_teacher_round_trip_and_logits(megatron_cpu, tiny, family, extra, tmp_path):  # noqa: F811
    """The teacher as saved on disk (per-expert keys) -> Megatron -> the same tensors; at TP1/EP1 (allgather
    dispatcher, sequential experts) the same routing and the same logits."""
    teacher = tiny(family, **extra)
    checkpoint, _ = assert_round_trip(teacher, tmp_path)
    ids = ids_for(3)
    assert_logits_match(megatron_logits(checkpoint, ids), hf_logits(teacher, ids), atol=1e-4)


@pytest.mark.parametrize("model_type,extra", [("deepseek_v2", {}), ("deepseek_v3", {}),
                                              ("deepseek_v3", {"rope_parameters": YARN})])
def test_deepseek_teacher_round_trip_and_logits(megatron_cpu, model_type, extra, tmp_path):  # noqa: F811
    """MLA (through our local core attention), a dense first layer, shared experts, V3's sigmoid routing with its
    fp32 correction bias and group-limited top-k, yarn: bitwise back, and HF's logits at fp32 (1e-4)."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from megatron_m2d.convert.megatron_model import megatron_core_version

    teacher = tiny_deepseek(tmp_path / "hf", model_type, **extra)
    if model_type == "deepseek_v2" and megatron_core_version() >= (0, 19):  # see build_gpt_model
        with pytest.raises(M2DError, match="without q compression"):
            hf_to_megatron_checkpoint(teacher, tmp_path / "megatron")
        return
    checkpoint, _ = assert_round_trip(teacher, tmp_path)
    ids = ids_for(7)
    assert_logits_match(megatron_logits(checkpoint, ids), hf_logits(teacher, ids), atol=1e-4)


def test_gpt_oss_teacher_round_trip_and_logits(megatron_cpu, tmp_path):  # noqa: F811
    """Sinks, sliding windows (every other layer), yarn, biased router and experts, clamped SwiGLU, fused
    interleaved experts stacked back on export: bitwise, and HF's logits at fp32 (1e-4)."""
    hf = tiny_gpt_oss(tmp_path / "hf")
    checkpoint, _ = assert_round_trip(hf, tmp_path)
    ids = ids_for(8)
    assert_logits_match(megatron_logits(checkpoint, ids), hf_logits(hf, ids), atol=1e-4)


def test_mxfp4_teacher_converts_dequantised(megatron_cpu, tmp_path):  # noqa: F811
    """GPT-OSS as published stores experts as MXFP4 blocks and scales: the converter dequantises them one expert at
    a time; the checkpoint exports back to exactly transformers' own dequantisation of the same tensors (everything
    else bitwise), without a quantization_config, and gives the dequantised HF model's logits."""
    import json

    from transformers import Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint
    from megatron_m2d.testing.tiny import with_mxfp4_experts

    hf = with_mxfp4_experts(tiny_gpt_oss(tmp_path / "hf"), tmp_path / "mxfp4")
    checkpoint = hf_to_megatron_checkpoint(hf, tmp_path / "megatron")
    back = safetensors_dir(megatron_to_hf_checkpoint(checkpoint, tmp_path / "back"))
    packed = safetensors_dir(hf)
    expected = {k: v for k, v in packed.items() if not k.endswith(("_blocks", "_scales"))}
    for name in [k.removesuffix("_blocks") for k in packed if k.endswith("_blocks")]:
        expected[name] = convert_moe_packed_tensors(packed[name + "_blocks"], packed[name + "_scales"],
                                                    dtype=torch.float32)
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                   quantization_config=Mxfp4Config(dequantize=True)).eval()
    ids = ids_for(9)
    with torch.no_grad():
        assert_logits_match(megatron_logits(checkpoint, ids), teacher(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("model_type,extra,message", [
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "num_experts_per_tok": 4, "topk_group": 2},
     "best expert"),
    ("deepseek_v3", {"norm_topk_prob": False}, "always normalises"),
    ("deepseek_v3", {"num_experts_per_tok": 3}, "top-2 experts")])
def test_deepseek_routing_megatron_cannot_express_is_refused(model_type, extra, message, tmp_path):
    from megatron_m2d.convert.megatron_model import transformer_config_kwargs

    config = AutoConfig.from_pretrained(tiny_deepseek(tmp_path / "hf", model_type, **extra))
    with pytest.raises(M2DError, match=message):
        transformer_config_kwargs(config)


def test_densified_fixture_student_converts_exactly(megatron_cpu, tmp_path):  # noqa: F811
    """The student exactly as densify wrote it (tied embeddings, bf16 on disk) converts bitwise, and its Megatron
    logits match. A trained model's logits reach ~20, so fp32 re-association noise is ~1e-5 (upcast from bf16):
    1e-3 still catches any wrong tensor (those move logits by > 0.1)."""
    student = densify(FIXTURE_MOE, tmp_path / "dense", "gld_reap", data="fixture", progress=False,
                      calibration=dict(tokens=1024, seq_len=128)).path
    checkpoint, back = assert_round_trip(student, tmp_path)
    assert all(v.dtype == torch.bfloat16 for v in safetensors_dir(back).values())
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(1))
    assert_logits_match(megatron_logits(checkpoint, ids), hf_logits(student, ids), atol=1e-3)


def test_streamed_checkpoint_is_the_one_megatron_writes(megatron_cpu, tiny, tmp_path):  # noqa: F811
    """Same tensor keys, global shapes, dtypes and chunking as megatron-core's own dist_checkpointing.save of the
    model loaded with the same weights; and our export reads Megatron's checkpoint back to the HF tensors."""
    from megatron.core import dist_checkpointing

    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint
    from megatron_m2d.convert.dcp_read import ChunkReader
    from megatron_m2d.convert.provider import load_checkpoint, model_provider

    teacher = tiny("qwen3_moe")
    ours = hf_to_megatron_checkpoint(teacher, tmp_path / "ours")
    model = model_provider(ours, use_te=False)()
    load_checkpoint(model, ours)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(theirs))
    def tensors(path):  # non-tensor entries differ by release (0.19 moves Megatron's common state into DCP)
        return {k: v for k, v in ChunkReader(path).metadata.state_dict_metadata.items() if hasattr(v, "chunks")}

    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    for key, stored in a.items():
        assert stored.size == b[key].size and stored.properties.dtype == b[key].properties.dtype
        assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in stored.chunks) == \
            sorted((tuple(c.offsets), tuple(c.sizes)) for c in b[key].chunks)
    for name in ("m2d_convert.json", "hf_side_files"):  # what our export needs beside Megatron's files
        (theirs / name).symlink_to(ours / name)
    back = safetensors_dir(megatron_to_hf_checkpoint(theirs, tmp_path / "back"))
    original = safetensors_dir(teacher)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
