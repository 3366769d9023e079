"""`m2d demo`: the whole offline path on the embedded default, on CPU, in about a minute.

Embedded default (until the trained fixture MoE lands): a small Qwen3-MoE with RANDOM weights (4 layers,
16 experts, top-2) built locally from a config, with a byte-level tokenizer. Calibration text is the bundled
Macbeth, held-out text the bundled Julius Caesar. With random weights the scorings cannot differ much in
quality; the demo shows the pipeline working end to end and prints whatever numbers come out.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from megatron_m2d.calibration.run import calibrate
from megatron_m2d.densification.run import densify
from megatron_m2d.evaluation.perplexity import perplexity_of_dir
from megatron_m2d.io.writer import check_output_path
from megatron_m2d.testing.tiny import build_tiny_moe

ASSETS = Path(__file__).parent / "assets"
CALIBRATION_TEXT = ASSETS / "macbeth.txt"
HELD_OUT_TEXT = ASSETS / "julius_caesar.txt"

# (label, densify keyword arguments): pure pruning with each scoring, and one merged configuration.
DEMO_METHODS = [
    ("selection_freq K=2", dict(scoring="selection_freq")),
    ("conditional_prob K=2", dict(scoring="conditional_prob")),
    ("reap K=2", dict(scoring="reap")),
    ("gram_logdet K=2", dict(scoring="gram_logdet")),
    ("gld_reap K=2 (DO-ACP)", dict(scoring="gld_reap")),
    ("random K=2", dict(scoring="random")),
    ("gld_reap K=4 round_robin proportional", dict(scoring="gld_reap", select=4, grouping="round_robin",
                                                   scaling="proportional")),
]


def build_default_teacher(path: Path) -> Path:
    return build_tiny_moe(path, "qwen3_moe", seed=0, layers=4, hidden=128, num_experts=16,
                          num_experts_per_tok=2, moe_intermediate_size=64, head_dim=32)


def run_demo(out: str | Path = "m2d-demo", tokens: int = 16384, eval_tokens: int = 16384, seq_len: int = 128,
             overwrite: bool = False, methods=None) -> list[dict]:
    out = Path(out)
    if out.exists():
        check_output_path(out, overwrite)
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    teacher = build_default_teacher(out / "teacher")
    stats = out / "stats"
    calibrate(teacher, str(CALIBRATION_TEXT), stats, tokens=tokens, seq_len=seq_len, gram=True, overwrite=True)
    ppl = lambda model: perplexity_of_dir(model, str(HELD_OUT_TEXT), seq_len=seq_len, max_tokens=eval_tokens)
    rows = [{"model": "teacher (MoE)", "ppl": ppl(teacher)["ppl"]}]
    for label, options in methods or DEMO_METHODS:
        student = out / ("dense-" + label.split()[0] + "-" + "-".join(label.split()[1:]).replace("=", "").lower())
        densify(teacher, student, stats=stats, overwrite=True, progress=False, **options)
        rows.append({"model": label, "ppl": ppl(student)["ppl"]})
    with (out / "demo.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "ppl"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nheld-out perplexity on {HELD_OUT_TEXT.name} ({eval_tokens} tokens, windows of {seq_len}):")
    print(f"{'model':<42} {'ppl':>10}")
    for row in rows:
        print(f"{row['model']:<42} {row['ppl']:>10.2f}")
    print(f"done in {time.perf_counter() - started:.0f} s; outputs in {out}/")
    return rows
