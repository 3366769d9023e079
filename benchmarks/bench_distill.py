"""Distillation throughput: our Megatron backend against the plain transformers + PyTorch loop, same shapes, same run.

    python benchmarks/bench_distill.py                              # CPU, tiny shapes: checks that it runs
    python benchmarks/bench_distill.py --preset qwen3-8l --seq-len 4096 --precision bf16 [--fp8 hybrid]   # a GPU

Presets: `fixture` (the shipped fixture MoE, trained, and its random-FFN student), `tiny` (a 4-layer Qwen3-MoE,
hidden 128, 8 experts top-2, vocabulary 8,192, and its K=k=2 student), `qwen3-8l` (Qwen3-30B-A3B's shapes
with 8 layers, 128 experts top-8, and its K=8 dense student: the 1.08 B student of the environment's H100
measurements). Weights are random (throughput does not depend on them); the models are written once to --work.
Both backends run in one process, their steps interleaved round by round (the median of the rounds is
reported), so a machine shared with other work slows both alike. Printed: tokens/s, MFU (on a GPU: model FLOPs
from megatron_m2d.planning.flops over the accelerator's dense bf16 peak; on CPU achieved GFLOP/s instead), where
the time of a micro-batch goes (each part timed alone on the step's shapes), and the peak memory of our KD loss
(forward and backward) beyond the logits it reads, against the bound its test enforces (2 x one model's bf16
logits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from distill_backends import MegatronEngine, PlainLoop, token_batch  # noqa: E402

PARTS = ("teacher_forward", "student_forward_backward", "kd_loss", "optimizer")


def build_pair(preset: str, work: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    """HF teacher and student directories of the preset (written once, random weights)."""
    from megatron_m2d.baselines.random_ffn import random_ffn
    from megatron_m2d.testing.tiny import build_tiny_moe, byte_tokenizer

    teacher, student = work / f"{preset}-teacher", work / f"{preset}-student"
    if preset == "fixture":  # the shipped fixture MoE (read only) and its random-FFN student
        from megatron_m2d.demo import FIXTURE_MOE

        teacher = FIXTURE_MOE
    if not (teacher / "config.json").exists():
        if preset == "tiny":
            # an 8,192-row vocabulary (ids stay below the byte tokenizer's 259) so the KD loss is not all overhead
            build_tiny_moe(teacher, "qwen3_moe", layers=4, hidden=128, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=64, head_dim=32, vocab_size=8192)
        else:
            from transformers import AutoModelForCausalLM

            from megatron_m2d.planning.shapes import read_hf_config

            config = read_hf_config(ROOT / "examples" / "configs" / "qwen3-30b-a3b")
            config.num_hidden_layers, config.max_window_layers = 8, 8
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(teacher)
            byte_tokenizer().save_pretrained(teacher)  # ids < 259 index the 151,936-row vocabulary as well
    if not (student / "config.json").exists():
        random_ffn(teacher, student, progress=False)  # the student densify writes at K = k, random FFN
    return teacher, student


def run_config(args, teacher: Path, student: Path, micro_batches: int):
    from megatron_m2d.distillation.megatron.config import RunConfig

    (args.work / "run" / "converted").mkdir(parents=True, exist_ok=True)  # the engine converts the HF pair there
    return RunConfig(teacher=str(teacher), student=str(student), data=["unused"], out=str(args.work / "run"),
                     micro_batch=args.micro_batch, global_batch=args.micro_batch * micro_batches,
                     seq_len=args.seq_len, steps=10**6, precision=args.precision, fp8=args.fp8,
                     teacher_ep=1, check_teacher=False, tensorboard=False, export=False)


def loss_peak(engine: MegatronEngine, tokens: int, vocab_rows: int, device: torch.device) -> tuple[float, float]:
    """(peak bytes of the KD loss's forward + backward beyond its inputs, one model's bf16 logits in bytes)."""
    from megatron_m2d.distillation.megatron.loss import kd_and_lm_per_token

    student = torch.randn(tokens, vocab_rows, dtype=torch.bfloat16, device=device, requires_grad=True)
    teacher = torch.randn(tokens, vocab_rows, dtype=torch.bfloat16, device=device)
    labels = torch.randint(0, engine.models.vocab_size, (tokens,), device=device)

    def loss():
        kd, lm = kd_and_lm_per_token(student, teacher, labels, 1.0, engine.models.vocab_size)
        (kd.mean() + lm.mean()).backward()

    one = student.numel() * student.element_size()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, one
    from megatron_m2d.testing.allocations import AllocationTrace

    with AllocationTrace() as trace:
        trace.mark("start")
        loss()
        trace.mark("end")
    return trace.peak("start", "end") - trace.live("start"), one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "fixture", "qwen3-8l"], default="tiny",
                        help="tiny: random 4-layer Qwen3-MoE; fixture: the shipped fixture MoE (4 layers, 16 experts "
                             "top-2, hidden 192, vocabulary 4,096); qwen3-8l: Qwen3-30B-A3B with 8 layers "
                             "(default: tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 256 (tiny), 4096 (qwen3-8l)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=2, help="per optimizer step (gradient accumulation)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--fp8", choices=["hybrid", "e4m3"], default=None, help="FP8 student GEMMs (needs TE)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timings per part per round")
    parser.add_argument("--work", type=Path, default=Path("bench-distill"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    args.seq_len = args.seq_len or (4096 if args.preset == "qwen3-8l" else 256)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    args.work.mkdir(parents=True, exist_ok=True)
    if not cuda:  # megatron-core needs the test suite's CPU patches off a GPU (tests/megatron_cpu.py)
        from tests.megatron_cpu import apply_cpu_patches

        apply_cpu_patches()
        torch._dynamo.config.disable = True
    teacher, student = build_pair(args.preset, args.work, dtype)
    engine = MegatronEngine(run_config(args, teacher, student, args.micro_batches), device)
    plain = PlainLoop(teacher, student, device, dtype, args.micro_batches)
    report(args, engine, plain, device)
    engine.close()


def report(args, engine: MegatronEngine, plain: PlainLoop, device: torch.device) -> None:
    import statistics

    from distill_backends import timed

    from megatron_m2d.planning.flops import step_flops
    from megatron_m2d.planning.layout import ACCELERATORS
    from megatron_m2d.planning.shapes import ModelShape

    vocab = engine.models.vocab_size
    batches = [token_batch(min(vocab, 259), args.micro_batch, args.seq_len, seed) for seed in range(args.micro_batches)]
    tokens = args.micro_batch * args.seq_len * args.micro_batches
    steps, parts = {b.name: [] for b in (plain, engine)}, {b.name: [] for b in (plain, engine)}
    for _ in range(args.rounds):  # interleaved: both backends see the same machine load
        for backend in (plain, engine):
            steps[backend.name].append(timed(lambda: backend.step(batches), device, 1))
            parts[backend.name].append(backend.parts(batches[0], args.repeats))
    flops = step_flops(ModelShape.from_dir(plain.student.name_or_path),
                       ModelShape.from_dir(plain.teacher.name_or_path), args.seq_len).total
    peak = None  # MFU only against a known accelerator's peak
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((a.peak_flops for key, a in ACCELERATORS.items() if key.upper() in name.upper()), None)
    print(f"\n{args.preset}: seq {args.seq_len}, micro-batch {args.micro_batch} x {args.micro_batches} per step, "
          f"{args.precision}{' + FP8 ' + args.fp8 if args.fp8 else ''}, {device}; "
          f"{flops / 1e9:.3f} GFLOP per token; median of {args.rounds} interleaved rounds")
    head = ["backend", "tokens/s", "MFU" if peak else "GFLOP/s", "step ms"] + [f"{p} ms" for p in PARTS]
    print(" | ".join(head) + "\n" + " | ".join("---" for _ in head))
    rates = {}
    for name in steps:
        seconds = statistics.median(steps[name])
        rates[name] = tokens / seconds
        use = f"{rates[name] * flops / peak:.1%}" if peak else f"{rates[name] * flops / 1e9:.2f}"
        cells = [f"{statistics.median(r[p] for r in parts[name]) * 1e3:.1f}" for p in PARTS]
        print(" | ".join([name, f"{rates[name]:,.0f}", use, f"{seconds * 1e3:.0f}", *cells]))
    print(f"megatron / plain tokens/s: {rates[engine.name] / rates[plain.name]:.2f}x")
    extra, one = loss_peak(engine, args.micro_batch * args.seq_len, engine.models.vocab_rows, device)
    print(f"KD loss ({args.micro_batch * args.seq_len} tokens x {engine.models.vocab_rows} vocabulary rows, forward "
          f"+ backward): peak {extra / 2**20:.1f} MiB beyond its inputs = {extra / one:.2f} x one model's bf16 logits "
          f"(bound 2.00 x)")


if __name__ == "__main__":
    main()
