"""Densifying a checkpoint on disk keeps peak memory at about one decoder layer, far below the model's size.

Measured, not assumed: `m2d densify --data` (calibration with the all-token Gram, then export) runs in a fresh
process and reports its peak RSS (VmHWM); a second fresh process that only imports the same modules gives
the baseline. The bound, stated: peak - baseline <= 4 decoder layers + the dense output (one output shard is
assembled in memory before it is written). The model is built straight to disk in shards, never in memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_m2d.testing.tiny import build_moe_on_disk

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of the (large) pytest process would
# report at least the parent's size; VmHWM belongs to the new address space alone.
PROBE = """
import sys
import torch, transformers
{imports}
from megatron_m2d.cli import main
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK", int(hwm.split()[1]) * 1024)
sys.exit(code)
"""
DENSIFY_IMPORTS = "import megatron_m2d.calibration.run, megatron_m2d.densification.run"
CONVERT_IMPORTS = "import megatron.core, megatron.core.models.gpt, megatron_m2d.convert.checkpoint"


def peak_rss(*argv, imports: str = DENSIFY_IMPORTS) -> int:
    """Peak RSS of `m2d argv...` in a fresh process that first imports `imports` (no argv: the baseline)."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports), *map(str, argv)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(next(line for line in result.stdout.splitlines() if line.startswith("PEAK")).split()[1])


def folder_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


@pytest.mark.timeout(600)
def test_densify_peak_memory_is_far_below_model_size(tmp_path, text_dir):
    layers = 16
    model = build_moe_on_disk(tmp_path / "moe", "qwen3_moe", layers=layers, hidden=512, num_experts=48,
                              num_experts_per_tok=2, moe_intermediate_size=384, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=64)
    model_bytes = folder_bytes(model, "*.safetensors")
    layer_bytes = max(p.stat().st_size for p in model.glob("*.safetensors"))  # one shard per decoder layer
    assert model_bytes > 1.7e9

    out = tmp_path / "dense"
    # fp32 compute: bf16 GEMMs on a CPU keep a cache of JIT-compiled kernels (oneDNN, one per GEMM shape met,
    # ~140 MB here and bounded: it stops growing once the shapes repeat) that has nothing to do with streaming
    peak = peak_rss("densify", "--model", model, "--data", text_dir, "--tokens", 1024, "--seq-len", 128,
                    "--scoring", "gld_reap", "--select", 8, "--groups", 4, "--dtype", "float32", "--out", out)
    baseline = peak_rss()
    output_bytes = folder_bytes(out, "*.safetensors")
    used = peak - baseline
    report = {"model_MB": model_bytes / 1e6, "layer_MB": layer_bytes / 1e6, "output_MB": output_bytes / 1e6,
              "baseline_MB": baseline / 1e6, "peak_MB": peak / 1e6, "peak_minus_baseline_MB": used / 1e6}
    print(json.dumps(report))
    assert used <= 4 * layer_bytes + output_bytes, report
    assert peak < 0.5 * model_bytes, report
    assert json.loads((out / "m2d_plan.json").read_text())["calibration"]["gram"] is True



@pytest.mark.timeout(900)
def test_megatron_conversion_streams_both_ways(tmp_path):
    """HF -> Megatron writes chunks as it computes them (the DCP writer holds at most one 256 MB file) and
    Megatron -> HF reads one decoder layer at a time (its output shards are 512 MB): stated bounds,
    peak - baseline <= 256 MB + 3 layers one way and 512 MB + 3 layers the other, on a 1.87 GB model."""
    pytest.importorskip("megatron.core")
    from megatron_m2d.convert.checkpoint import EXPORT_SHARD_BYTES
    from megatron_m2d.convert.dcp_stream import FILE_BYTES

    model = build_moe_on_disk(tmp_path / "moe", "qwen3_moe", layers=16, hidden=512, num_experts=48,
                              num_experts_per_tok=2, moe_intermediate_size=384, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=64)
    model_bytes = folder_bytes(model, "*.safetensors")
    layer_bytes = max(p.stat().st_size for p in model.glob("*.safetensors"))
    baseline = peak_rss(imports=CONVERT_IMPORTS)
    to_megatron = peak_rss("convert", "hf-to-megatron", "--model", model, "--out", tmp_path / "megatron",
                           imports=CONVERT_IMPORTS)
    to_hf = peak_rss("convert", "megatron-to-hf", "--model", tmp_path / "megatron", "--out", tmp_path / "back",
                     imports=CONVERT_IMPORTS)
    report = {"model_MB": model_bytes / 1e6, "layer_MB": layer_bytes / 1e6, "baseline_MB": baseline / 1e6,
              "hf_to_megatron_peak_MB": to_megatron / 1e6, "megatron_to_hf_peak_MB": to_hf / 1e6}
    print(json.dumps(report))
    assert to_megatron - baseline <= FILE_BYTES + 3 * layer_bytes, report
    assert to_hf - baseline <= EXPORT_SHARD_BYTES + 3 * layer_bytes, report
    assert to_megatron < 0.4 * model_bytes and to_hf < 0.7 * model_bytes, report
    names = [json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].keys()
             for d in (model, tmp_path / "back")]
    assert set(names[0]) == set(names[1])
