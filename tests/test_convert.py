"""Megatron-Core conversion: every supported family round-trips bitwise through a streamed distributed checkpoint,
and the Megatron model built from its provider config gives the HF logits at TP1, TP2, EP2 and PP2."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_m2d.convert import mapping
from megatron_m2d.convert.dense_mapping import DENSE_TYPES
from megatron_m2d.convert.parallel import ParallelSizes
from megatron_m2d.demo import FIXTURE_MOE
from megatron_m2d.densification.run import densify
from megatron_m2d.errors import M2DError
from megatron_m2d.testing.tiny import byte_tokenizer
from tests.megatron_cpu import causal_mask, megatron_cpu, run_parallel  # noqa: F401  (fixture)

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


# ---- 2 gloo processes -------------------------------------------------------------------------------------------

def test_checkpoint_loads_at_tp2(megatron_cpu, tmp_path):  # noqa: F811
    """Resharding on load: the one-process checkpoint, loaded at tensor parallel 2, gives HF's logits (the TP
    all-reduces sum partial products in another order: 1e-4)."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint

    hf = tiny_dense(tmp_path / "hf", "qwen3")
    checkpoint = hf_to_megatron_checkpoint(hf, tmp_path / "megatron", ParallelSizes(tp=2))
    ids = ids_for(4)
    torch.save(ids, tmp_path / "ids.pt")
    run_parallel(2, sizes=dict(tp=2), checkpoint=checkpoint, ids=tmp_path / "ids.pt", logits=tmp_path / "l.pt")
    assert_logits_match(torch.load(tmp_path / "l.pt", weights_only=True), hf_logits(hf, ids), atol=1e-4)


@pytest.mark.parametrize("family,sizes", [("qwen3_moe", dict(ep=2)), ("qwen3_moe", dict(pp=2)),
                                          ("deepseek_v3", dict(ep=2))])
def test_moe_checkpoint_loads_at_ep2_and_pp2(megatron_cpu, tiny, family, sizes, tmp_path):  # noqa: F811
    """EP2: half the experts per rank, tokens gathered and combined; PP2: one layer per stage. Same logits."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint

    hf = teacher(tiny, family, tmp_path / "hf")
    checkpoint = hf_to_megatron_checkpoint(hf, tmp_path / "megatron", ParallelSizes(**sizes))
    ids = ids_for(5)
    torch.save(ids, tmp_path / "ids.pt")
    run_parallel(2, sizes=sizes, checkpoint=checkpoint, ids=tmp_path / "ids.pt", logits=tmp_path / "l.pt")
    assert_logits_match(torch.load(tmp_path / "l.pt", weights_only=True), hf_logits(hf, ids), atol=1e-4)


@pytest.mark.parametrize("family,extra,sizes", [("qwen3", {}, dict(tp=2)), ("qwen3_moe", {}, dict(ep=2)),
                                                ("qwen2_moe", {"mlp_only_layers": [0]}, dict(pp=2)),
                                                ("qwen3", {"num_hidden_layers": 4}, dict(pp=2, vpp=2)),
                                                ("gpt_oss", {}, dict(ep=2))])
def test_checkpoint_written_at_tp2_ep2_pp2_loads_at_tp1(megatron_cpu, tiny, family, extra, sizes,  # noqa: F811
                                                        tmp_path):
    """2 ranks each write their shard of the target layout (TP2, EP2, PP2, PP2 x VPP2); one process loads it
    and gives HF's logits."""
    from megatron_m2d.convert.dcp_read import ChunkReader

    hf = teacher(tiny, family, tmp_path / "hf", **extra)
    run_parallel(2, sizes=sizes, hf=hf, checkpoint=tmp_path / "megatron")
    stored = ChunkReader(tmp_path / "megatron").metadata
    files = {info.relative_path for info in stored.storage_data.values()}
    assert any(f.startswith("__1_") for f in files), "rank 1 wrote nothing"
    qkv = stored.state_dict_metadata.get("decoder.layers.self_attention.linear_qkv.weight")  # stacked layers
    if "tp" in sizes:  # a TP-sharded weight is stored as two row blocks per layer
        assert len(qkv.chunks) == 4
    if "vpp" in sizes:  # interleaved virtual stages: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3
        file_of = {(k.fqn, tuple(k.offset)): v.relative_path for k, v in stored.storage_data.items()
                   if k.offset is not None}
        assert [file_of[("decoder.layers.self_attention.linear_qkv.weight", tuple(c.offsets))][:3]
                for c in sorted(qkv.chunks, key=lambda c: c.offsets[0])] == ["__0", "__1", "__0", "__1"]
    ids = ids_for(6)
    assert_logits_match(megatron_logits(tmp_path / "megatron", ids), hf_logits(hf, ids), atol=1e-4)


# ---- bad input ---------------------------------------------------------------------------------------------------

def _convert_cli(capsys, *args) -> str:
    from megatron_m2d.cli import main

    capsys.readouterr()
    assert main(["convert", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flags,message", [(["--tp", "3"], "--tp 3 does not divide the 4 attention heads"),
                                           (["--ep", "3"], "--ep 3 does not divide the 8 experts")])
def test_cli_refuses_parallel_sizes_that_do_not_divide(tiny, flags, message, tmp_path, capsys):
    pytest.importorskip("megatron.core")
    err = _convert_cli(capsys, "hf-to-megatron", "--model", str(tiny("qwen3_moe")), "--out", str(tmp_path / "m"),
                       *flags)
    assert message in err
    assert not (tmp_path / "m").exists() and list(tmp_path.glob(".m.tmp*")) == []


def test_cli_refuses_a_family_megatron_cannot_express(tiny, tmp_path, capsys):
    pytest.importorskip("megatron.core")
    err = _convert_cli(capsys, "hf-to-megatron", "--model", str(tiny("olmoe")), "--out", str(tmp_path / "m"))
    assert "normalises each head separately" in err and not (tmp_path / "m").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_cli_without_cuda_says_which_families_need_a_gpu(tiny, family, tmp_path):
    """In a process without our test patches: megatron-core creates MLA's rotary tables and the sinks' offsets on
    the current CUDA device, so on a CPU-only machine these conversions stop with one line and write nothing."""
    import subprocess
    import sys

    pytest.importorskip("megatron.core")
    hf = teacher(tiny, family, tmp_path / "hf")
    result = subprocess.run([sys.executable, "-m", "megatron_m2d.cli", "convert", "hf-to-megatron", "--model",
                             str(hf), "--out", str(tmp_path / "m")], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("m2d: error: megatron-core needs a CUDA device")
    assert not (tmp_path / "m").exists()


def test_cli_refuses_a_truncated_shard(tiny, tmp_path, capsys):
    pytest.importorskip("megatron.core")
    teacher = tiny("qwen3_moe")
    shard = teacher / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = _convert_cli(capsys, "hf-to-megatron", "--model", str(teacher), "--out", str(tmp_path / "m"))
    assert "model.safetensors" in err and not (tmp_path / "m").exists()
