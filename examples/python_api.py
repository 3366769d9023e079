"""The Python API mirrors the CLI: calibrate once, then try several methods from the same statistics.

    python examples/python_api.py            # runs on a tiny random Qwen3-MoE built on the spot
"""

import tempfile
from pathlib import Path

from megatron_m2d import KernelOptions, calibrate, densify, inspect_stats, perplexity_of_dir
from megatron_m2d.demo import CALIBRATION_TEXT, HELD_OUT_TEXT
from megatron_m2d.testing.tiny import build_tiny_moe

work = Path(tempfile.mkdtemp(prefix="m2d-api-"))
teacher = build_tiny_moe(work / "teacher", "qwen3_moe", layers=2, num_experts=8, num_experts_per_tok=2)
stats = calibrate(teacher, str(CALIBRATION_TEXT), work / "stats", tokens=8192, seq_len=128, gram=True)
for row in inspect_stats(stats.path):
    print(row)

for name, options in {
    "do-acp": dict(scoring="gld_reap"),
    "do-acp-gated": dict(scoring="gld_reap", kernel=KernelOptions(gram="gated")),
    "sf-k4-rr": dict(scoring="selection_freq", select=4, grouping="round_robin", scaling="proportional"),
}.items():
    result = densify(teacher, work / name, stats=stats.path, progress=False, **options)
    ppl = perplexity_of_dir(result.path, str(HELD_OUT_TEXT), seq_len=128, max_tokens=4096)["ppl"]
    print(f"{name:<14} kept {result.plan['layers']['0']['selected']}  held-out ppl {ppl:.2f}")
