"""Calibration: `m2d calibrate` vs the plain transformers + PyTorch loop, side by side in one run.

The plain way loads the whole model with `from_pretrained` in the checkpoint's own dtype, runs its decoder stack
(`model.model`: the LM head is no part of calibration, so it is left out) with `output_router_logits=True`, and
accumulates the routing sums (counts, probability and weight sums) from the router logits. `m2d calibrate`
streams one decoder layer at a time and records every statistic densify uses (routing sums, REAP, gate-weighted
Gram, routed output means, logit profiles) in its default settings; `--gram` adds the all-token Gram (every
expert on every token). Every run is a fresh process reporting its wall time (after imports) and peak RSS
(VmHWM); the variants are interleaved and repeated, and the table gives the median (machines are shared: ratios
within one run are what to compare). The Gram pass's GEMM rate is set against the device's matmul ceiling, the
best of its fp32 and bf16 GEMM rates (2048^3), measured by the same process in the same moments as the pass: the
bf16 rate is sampled before every batch's Gram pass (outside its timing, and taken off the wall time) and its
median used, because on this shared 2-core machine it moved between ~350 and ~1,800 GFLOP/s within one run (AMX
units shared or not), so a ceiling measured once, minutes apart or even just before or after the pass, describes
other conditions than the pass ran in. Beside it, the same process times one expert's forward alone at the
layer's shape (GEMMs and SwiGLU gate) against a ceiling sampled right then: what the pass's kernels reach at that
shape before the Gram GEMM and the output sums, which separates the shape's limits from the pass's.

Shapes: the committed fixture, a configurable random MoE, and Qwen3-30B-A3B's real shapes with a few layers
(random weights, bf16).

    python benchmarks/bench_calibrate.py [--repeats 3] [--layers 8 --experts 32 --hidden 512 ...]
                                         [--qwen3-layers 2 --qwen3-tokens 8192] [--only fixture,custom,qwen3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MATMUL_RATE = r"""
import time, torch
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
def matmul_rates(n=2048, repeats=5, names=tuple(DTYPES)):
    rates = {"threads": torch.get_num_threads()}
    for name, dtype in ((name, DTYPES[name]) for name in names):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * n ** 3 / best / 1e9
    return rates

def expert_rate(hidden, width, dtype, rows=2048, repeats=5):
    # GFLOP/s of ONE expert's forward (gate/up GEMM, SwiGLU gate, down GEMM) on `rows` tokens at the layer's
    # shape: what the Gram pass's kernels reach on their own, before its Gram GEMM and output sums.
    F = torch.nn.functional
    x, gate_up = torch.randn(rows, hidden).to(dtype), torch.randn(hidden, 2 * width).to(dtype)
    down = torch.randn(width, hidden).to(dtype)
    def forward():
        gate, up = (x @ gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ down
    forward()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter(); forward(); best = min(best, time.perf_counter() - t0)
    return 2 * rows * 3 * hidden * width / best / 1e9
"""
RUNNER = MATMUL_RATE + r"""
import json, sys, time
import torch, transformers
from megatron_m2d.data.text import token_blocks
mode, model, data, tokens, seq_len, batch, out = sys.argv[1:8]
tokens, seq_len, batch = int(tokens), int(seq_len), int(batch)
start = time.perf_counter()
result, samples, sampling = {}, [], 0.0
if mode == "gram":
    # The bf16 ceiling, sampled before every batch's Gram pass (outside its timing, and taken off the wall time):
    # on a shared machine it moves by several times within a run, so a ceiling measured once, before or after the
    # pass, can describe other conditions than the pass ran in. The fp32 rate barely moves: measured once.
    from megatron_m2d.calibration.statistics import MoEStatistics
    fp32, timed_pass = matmul_rates(names=("fp32",))["fp32"], MoEStatistics.add_all_expert_gram
    def sampled_pass(self, experts, x):
        global sampling
        t0 = time.perf_counter()
        samples.append(matmul_rates(repeats=2, names=("bf16",))["bf16"])
        sampling += time.perf_counter() - t0
        return timed_pass(self, experts, x)
    MoEStatistics.add_all_expert_gram = sampled_pass
    start = time.perf_counter()
if mode == "plain":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(model, dtype="auto").eval()
    blocks = token_blocks(AutoTokenizer.from_pretrained(model), data, tokens, seq_len)
    cfg = m.config
    k, E = cfg.num_experts_per_tok, cfg.num_experts
    count, prob, weight = {}, {}, {}
    with torch.no_grad():
        for ids in blocks.split(batch):
            for layer, z in enumerate(m.model(input_ids=ids, output_router_logits=True).router_logits):
                p = torch.softmax(z.float(), -1)
                top = torch.topk(p, k, -1)
                g = top.values / top.values.sum(-1, keepdim=True) if cfg.norm_topk_prob else top.values
                count[layer] = count.get(layer, 0) + torch.bincount(top.indices.flatten(), minlength=E)
                prob[layer] = prob.get(layer, 0) + p.sum(0).double()
                weight[layer] = torch.zeros(E, dtype=torch.float64).index_add_(
                    0, top.indices.flatten(), g.flatten().double()) + weight.get(layer, 0)
    result["dtype"] = str(m.dtype).removeprefix("torch.")
else:
    from megatron_m2d.calibration.run import calibrate
    stats = calibrate(model, data, out, tokens=tokens, seq_len=seq_len, batch_size=batch, gram=(mode == "gram"),
                      progress=False, overwrite=True)
    result.update(dtype=stats.meta["dtype"], gram_seconds=stats.meta["gram_seconds"])
result["seconds"] = time.perf_counter() - start - sampling
if mode == "gram":
    samples.sort()
    result["ceiling"] = {"threads": torch.get_num_threads(), "fp32": fp32, "bf16": samples[len(samples) // 2],
                         "bf16_low": samples[0], "bf16_high": samples[-1]}
    config = json.load(open(f"{model}/config.json"))
    shares = sorted(  # each over a ceiling of the same moment; the median of five such pairs
        expert_rate(config["hidden_size"], config["moe_intermediate_size"], getattr(torch, result["dtype"]))
        / max(fp32, matmul_rates(repeats=2, names=("bf16",))["bf16"]) for _ in range(5))
    result["expert_share"] = shares[2]
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({**result, "peak_mb": int(hwm.split()[1]) / 1024}))
"""

CEILING = MATMUL_RATE + "import json; print(json.dumps(matmul_rates()))"

VARIANTS = {"plain": "plain HF loop (routing sums only)", "ours": "m2d calibrate (every statistic but the Gram)",
            "gram": "m2d calibrate --gram"}


def subprocess_json(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def describe(model: Path) -> dict:
    config = json.loads((model / "config.json").read_text())
    experts = config.get("num_experts") or config.get("num_local_experts")
    return {"layers": config["num_hidden_layers"], "experts": experts, "top_k": config["num_experts_per_tok"],
            "hidden": config["hidden_size"], "width": config["moe_intermediate_size"],
            "dtype": config.get("dtype") or config.get("torch_dtype") or "float32",
            "size_mb": sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20}


def bench_shape(name: str, model: Path, data: str, tokens: int, seq_len: int, batch: int, repeats: int,
                variants: list[str], ceilings: list[dict], out: Path) -> None:
    from megatron_m2d.calibration.gram import gram_flops

    runs = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:  # interleaved, so that load from others falls on every variant alike
            runs[variant].append(subprocess_json(RUNNER, variant, str(model), data, str(tokens), str(seq_len),
                                                 str(batch), str(out)))
    shape = describe(model)
    print(f"\n### {name}: {shape['layers']} layers, {shape['experts']} experts top-{shape['top_k']}, hidden "
          f"{shape['hidden']}, expert width {shape['width']}, {shape['dtype']} checkpoint ({shape['size_mb']:,.0f} "
          f"MiB), {tokens:,} tokens, batches of {batch} x {seq_len}")
    print("| variant | compute dtype | seconds (median) | tokens/s | vs plain (median of runs) | peak RSS MiB | "
          "Gram GFLOP/s | % of ceiling | one expert's forward, % of ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain = [r["seconds"] for r in runs["plain"]]
    for variant in variants:
        seconds = [r["seconds"] for r in runs[variant]]
        ratios = [p / s for p, s in zip(plain, seconds)]
        if variant == "gram":
            flops = shape["layers"] * gram_flops(shape["experts"], shape["hidden"], shape["width"], tokens)
            rates = [flops / r["gram_seconds"] / 1e9 for r in runs[variant]]
            shares = [rate / max(r["ceiling"]["fp32"], r["ceiling"]["bf16"]) for rate, r in zip(rates, runs[variant])]
            expert_shares = [r["expert_share"] for r in runs[variant]]
            ceilings.extend(r["ceiling"] for r in runs[variant])
            gram = (f"{statistics.median(rates):,.0f} | {100 * statistics.median(shares):.0f} % | "
                    f"{100 * statistics.median(expert_shares):.0f} %")
        else:
            gram = " | | "
        print(f"| {VARIANTS[variant]} | {runs[variant][0]['dtype']} | {statistics.median(seconds):.1f} | "
              f"{tokens / statistics.median(seconds):,.0f} | {statistics.median(ratios):.2f}x | "
              f"{max(r['peak_mb'] for r in runs[variant]):,.0f} | {gram} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="fixture,custom,qwen3")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fixture-tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=8, help="configurable shape")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--width", type=int, default=256, help="expert intermediate size")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtype", default="float32", help="configurable shape's checkpoint dtype")
    parser.add_argument("--qwen3-layers", type=int, default=2, help="Qwen3-30B-A3B shapes: 1.2 GB per layer")
    parser.add_argument("--qwen3-tokens", type=int, default=8192,
                        help="enough that the forward, not the one-off load, dominates")
    args = parser.parse_args()

    import torch

    from megatron_m2d.demo import CALIBRATION_TEXT, FIXTURE_MOE
    from megatron_m2d.testing.tiny import build_moe_on_disk

    only, data = args.only.split(","), str(CALIBRATION_TEXT)
    ceilings = [subprocess_json(CEILING)]
    variants = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stats"
        if "fixture" in only:
            bench_shape("fixture (trained, committed)", FIXTURE_MOE, "fixture", args.fixture_tokens, args.seq_len,
                        args.batch_size, args.repeats, variants, ceilings, out)
        if "custom" in only:
            model = build_moe_on_disk(Path(tmp) / "custom", "qwen3_moe", layers=args.layers, hidden=args.hidden,
                                      num_experts=args.experts, num_experts_per_tok=args.top_k,
                                      moe_intermediate_size=args.width, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=args.hidden // 8, dtype=getattr(torch, args.dtype))
            bench_shape("configurable random MoE", model, data, args.tokens, args.seq_len, args.batch_size,
                        args.repeats, variants, ceilings, out)
        if "qwen3" in only:
            model = build_moe_on_disk(Path(tmp) / "qwen3", "qwen3_moe", layers=args.qwen3_layers, hidden=2048,
                                      num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                      num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                      vocab_size=151936, intermediate_size=6144, max_position_embeddings=4096,
                                      dtype=torch.bfloat16)
            bench_shape("Qwen3-30B-A3B shapes (random weights)", model, data, args.qwen3_tokens, args.seq_len,
                        args.batch_size, max(1, args.repeats - 1), variants, ceilings, out)
    spread = {"fp32": (min(c["fp32"] for c in ceilings), max(c["fp32"] for c in ceilings)),
              "bf16": (min(c.get("bf16_low", c["bf16"]) for c in ceilings),
                       max(c.get("bf16_high", c["bf16"]) for c in ceilings))}
    print(f"\nmatmul ceiling (2048^3 GEMMs, {ceilings[0]['threads']} threads) over this run: fp32 "
          f"{spread['fp32'][0]:,.0f}-{spread['fp32'][1]:,.0f} GFLOP/s, bf16 {spread['bf16'][0]:,.0f}-"
          f"{spread['bf16'][1]:,.0f} GFLOP/s. The Gram's % is its rate over the ceiling of the same moments (the "
          f"median of bf16 rates sampled before every batch of the pass, or the fp32 rate if higher), median over "
          f"runs. The last column is one expert's forward alone (its GEMMs and SwiGLU gate on 2,048 tokens) over a "
          f"ceiling sampled right then: what these kernels reach at this shape before the Gram GEMM and the output "
          f"sums; at small widths the elementwise gate costs about as much as the GEMMs.")


if __name__ == "__main__":
    main()
