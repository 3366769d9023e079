"""Calibration: our layer-streaming pass vs the plain transformers + PyTorch way, in the same run.

The plain way loads the whole model with `from_pretrained`, runs it with `output_router_logits=True` and hooks,
and accumulates the routing sums (counts, probability and weight sums) from the router logits. Ours streams one
decoder layer at a time from safetensors and records every statistic densify uses (routing sums, REAP,
gate-weighted Gram, mean outputs, logit profiles); with --gram also the all-token Gram (every expert on every
token). Each variant runs in a fresh process, which reports its wall time and peak RSS (VmHWM).

    python benchmarks/bench_calibrate.py [--layers 8] [--experts 32] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUNNER = r"""
import json, sys, time
import torch
mode, model, data, tokens, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(torch.get_num_threads())
start = time.perf_counter()
if mode == "plain":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from megatron_m2d.data.text import token_blocks
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    blocks = token_blocks(AutoTokenizer.from_pretrained(model), data, tokens, seq_len)
    cfg = m.config
    k, E, n = cfg.num_experts_per_tok, cfg.num_experts, cfg.num_hidden_layers
    count = torch.zeros(n, E); prob = torch.zeros(n, E, dtype=torch.float64); weight = torch.zeros(n, E, dtype=torch.float64)
    with torch.no_grad():
        for batch in blocks.split(8):
            logits = m(input_ids=batch, output_router_logits=True).router_logits
            for layer, z in enumerate(logits):
                p = torch.softmax(z.float(), -1)
                top = torch.topk(p, k, -1)
                g = top.values / top.values.sum(-1, keepdim=True)
                count[layer] += torch.bincount(top.indices.flatten(), minlength=E)
                prob[layer] += p.sum(0).double()
                weight[layer].index_add_(0, top.indices.flatten(), g.flatten().double())
else:
    from megatron_m2d.calibration.run import calibrate
    calibrate(model, data, sys.argv[6], tokens=tokens, seq_len=seq_len, gram=(mode == "ours+gram"),
              progress=False, overwrite=True)
seconds = time.perf_counter() - start
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mb": int(hwm.split()[1]) / 1024}))
"""


def run(mode: str, model: Path, data: str, tokens: int, seq_len: int, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", RUNNER, mode, str(model), data, str(tokens), str(seq_len), str(out)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    from megatron_m2d.demo import CALIBRATION_TEXT
    from megatron_m2d.testing.tiny import build_moe_on_disk

    with tempfile.TemporaryDirectory() as tmp:
        model = build_moe_on_disk(Path(tmp) / "moe", "qwen3_moe", layers=args.layers, hidden=args.hidden,
                                  num_experts=args.experts, num_experts_per_tok=4, moe_intermediate_size=args.hidden // 2,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8)
        size_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
        rows = []
        for mode in ("plain", "ours", "ours+gram"):
            result = run(mode, model, str(CALIBRATION_TEXT), args.tokens, args.seq_len, Path(tmp) / "stats")
            rows.append((mode, result["seconds"], args.tokens / result["seconds"], result["peak_mb"]))
    print(f"\nqwen3_moe, {args.layers} layers, {args.experts} experts top-4, hidden {args.hidden}, "
          f"{size_mb:.0f} MiB on disk, {args.tokens} tokens, fp32 CPU")
    print(f"{'variant':<12} {'seconds':>8} {'tokens/s':>10} {'peak RSS MiB':>13}")
    names = {"plain": "plain HF", "ours": "m2d", "ours+gram": "m2d --gram"}
    for mode, seconds, rate, peak in rows:
        print(f"{names[mode]:<12} {seconds:>8.1f} {rate:>10,.0f} {peak:>13,.0f}")


if __name__ == "__main__":
    main()
