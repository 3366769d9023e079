"""Peak memory of a streaming `m2d densify` per MoE family, against the checkpoint's size and its largest layer.

For every family a random checkpoint of the same shape budget is written straight to disk (one shard per decoder
layer, experts as transformers saves them: per expert, fused for GPT-OSS, and GPT-OSS also in MXFP4 as it is
published), then `m2d densify --data ... --scoring gld_reap` (calibration with the all-token Gram, then the
export) runs in a fresh process that reports its peak RSS (VmHWM); a fresh process that only imports the same
modules gives the baseline. Checkpoints are written and deleted one at a time.

    python benchmarks/bench_family_memory.py [--layers 8] [--hidden 512] [--experts 32] [--families a,b]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_m2d.testing.tiny import build_moe_on_disk, write_sample_text

PROBE = """
import sys
import torch, transformers
import megatron_m2d.calibration.run, megatron_m2d.densification.run
from megatron_m2d.cli import main
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK", int(hwm.split()[1]) * 1024)
sys.exit(code)
"""


def peak_rss(*argv) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return int(next(line for line in result.stdout.splitlines() if line.startswith("PEAK")).split()[1])


def shapes(layers: int, hidden: int, experts: int) -> dict[str, dict]:
    """Per family: the same hidden size, layer count, expert count and expert width (top-4)."""
    width = hidden * 3 // 4
    common = dict(layers=layers, hidden=hidden, num_experts_per_tok=4, num_attention_heads=8)
    mla = dict(num_key_value_heads=8, kv_lora_rank=hidden // 4, qk_rope_head_dim=32, qk_nope_head_dim=64,
               v_head_dim=64, moe_intermediate_size=width, n_routed_experts=experts, intermediate_size=4 * width)
    return {
        "qwen3_moe": dict(model_type="qwen3_moe", num_experts=experts, moe_intermediate_size=width,
                          num_key_value_heads=4, head_dim=64, **common),
        "qwen2_moe": dict(model_type="qwen2_moe", num_experts=experts, moe_intermediate_size=width,
                          shared_expert_intermediate_size=2 * width, num_key_value_heads=4, **common),
        "mixtral": dict(model_type="mixtral", num_local_experts=experts, intermediate_size=width,
                        num_key_value_heads=4, head_dim=64, **common),
        "olmoe": dict(model_type="olmoe", num_experts=experts, intermediate_size=width, num_key_value_heads=8,
                      **common),
        "deepseek_v2": dict(model_type="deepseek_v2", n_shared_experts=2, first_k_dense_replace=1, **mla, **common),
        "deepseek_v3": dict(model_type="deepseek_v3", n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=hidden,
                            n_group=4, topk_group=2, **mla, **common),
        "gpt_oss": dict(model_type="gpt_oss", num_local_experts=experts, intermediate_size=width,
                        num_key_value_heads=4, head_dim=64, **common),
        "gpt_oss (MXFP4)": dict(model_type="gpt_oss", num_local_experts=experts, intermediate_size=width,
                                num_key_value_heads=4, head_dim=64, mxfp4=True, **common),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--families", help="comma-separated subset of the table's rows")
    args = parser.parse_args()
    cases = shapes(args.layers, args.hidden, args.experts)
    wanted = args.families.split(",") if args.families else list(cases)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = write_sample_text(tmp / "text", documents=16, repeat=20)
        baseline = peak_rss()
        rows = []
        for name in wanted:
            fields = dict(cases[name])
            model = build_moe_on_disk(tmp / "model", fields.pop("model_type"), **fields)
            shards = sorted(model.glob("*.safetensors"))
            model_mb = sum(p.stat().st_size for p in shards) / 1e6
            layer_mb = max(p.stat().st_size for p in shards[:-1]) / 1e6  # the last shard: embeddings, head
            out = tmp / "dense"
            peak = peak_rss("densify", "--model", model, "--data", text, "--tokens", args.tokens, "--seq-len", 128,
                            "--scoring", "gld_reap", "--out", out)
            output_mb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
            rows.append((name, model_mb, layer_mb, output_mb, peak / 1e6, (peak - baseline) / 1e6))
            shutil.rmtree(model)
            shutil.rmtree(out)
            print(f"done {name}", file=sys.stderr)
    print(f"baseline (imports only): {baseline / 1e6:,.0f} MB; {args.layers} layers, hidden {args.hidden}, "
          f"{args.experts} experts, top-4, {args.tokens} calibration tokens, fp32 compute on CPU\n")
    print("| family | checkpoint MB | largest layer MB | student MB | peak RSS MB | peak - baseline MB | "
          "(peak - baseline) / layer |")
    print("|---|---|---|---|---|---|---|")
    for name, model_mb, layer_mb, output_mb, peak_mb, used_mb in rows:
        print(f"| {name} | {model_mb:,.0f} | {layer_mb:,.0f} | {output_mb:,.0f} | {peak_mb:,.0f} | {used_mb:,.0f} | "
              f"{used_mb / layer_mb:.1f} |")


if __name__ == "__main__":
    main()
