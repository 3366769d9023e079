"""Megatron-Core conversion across processes: checkpoints resharded on load (TP2, EP2, PP2) and written by 2 gloo
ranks at a parallel layout give the HF logits; the command line refuses layouts and families in one line."""

from __future__ import annotations

import pytest
import torch

from megatron_m2d.convert.parallel import ParallelSizes
from tests.convert_models import assert_logits_match, hf_logits, ids_for, megatron_logits, teacher, tiny_dense
from tests.megatron_cpu import megatron_cpu, run_parallel  # noqa: F401  (fixture)


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
