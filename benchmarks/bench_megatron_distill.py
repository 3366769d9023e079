"""Distillation step throughput: the Megatron engine vs the plain transformers + PyTorch loop, in the same run.

Same teacher (the fixture MoE), same student (its random-FFN dense student, K = top-k), same token batches, same
loss (forward KL + LM, the HF backend's `micro_batch_loss` for the plain loop; loss.py's chunked one for the
engine), AdamW and gradient clipping in both. The plain loop is the HF backend's step: teacher forward under
no_grad, student forward and backward per micro-batch, one optimizer step. The engine's is `loop.train_step`
(megatron-core's schedule, DDP buffers, its optimizer) on one process (TP1/PP1). Variants run interleaved,
`--rounds` times each; the table gives each one's best round (least disturbed by other work on a shared machine)
and its ratio to the plain loop. On a machine without CUDA the engine runs fp32 through the test suite's CPU
patches of megatron-core (tests/megatron_cpu.py; megatron-core assumes CUDA in places); on a GPU, bf16.

    python benchmarks/bench_megatron_distill.py [--seq-len 256] [--micro-batch 4] [--micro-batches 2]
                                                [--steps 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/megatron_cpu.py, for the CPU patches


def plain_loop(teacher_dir: Path, student_dir: Path, device, dtype, lr: float):
    from transformers import AutoModelForCausalLM

    from megatron_m2d.distillation.hf import micro_batch_loss

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95))

    def step(micro_batches: list[torch.Tensor]) -> float:
        total = 0.0
        for ids in micro_batches:
            ids = ids.to(device)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            loss, _, _ = micro_batch_loss(student(input_ids=ids).logits, teacher_logits, ids, 1.0, 1.0)
            (loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def engine_loop(teacher_dir: Path, student_dir: Path, out: Path, args, lr: float):
    from megatron_m2d.distillation.megatron.config import RunConfig
    from megatron_m2d.distillation.megatron.loop import build_engine, train_step
    from megatron_m2d.distillation.megatron.parallel import device, initialize
    from tests.megatron_engine import megatron_batch

    config = RunConfig(teacher=str(teacher_dir), student=str(student_dir), data=["unused"], out=str(out),
                       precision="bf16" if torch.cuda.is_available() else "fp32", seq_len=args.seq_len,
                       micro_batch=args.micro_batch, global_batch=args.micro_batch * args.micro_batches,
                       steps=10**6, warmup=0, lr=lr, schedule="constant", check_teacher=False)
    engine = build_engine(config, initialize(config), student_dir, teacher_dir, device())

    def step(micro_batches: list[torch.Tensor]) -> float:
        return train_step(engine, iter([megatron_batch(ids) for ids in micro_batches]))["loss"]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch (default: 4)")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (default: 2)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and variant (default: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant (default: 3)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        from tests.megatron_cpu import apply_cpu_patches

        apply_cpu_patches()
        torch._dynamo.config.disable = True
    from megatron_m2d.baselines.random_ffn import random_ffn
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from megatron_m2d.demo import FIXTURE_MOE

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student = random_ffn(FIXTURE_MOE, tmp / "student", progress=False)
        teacher_mc = hf_to_megatron_checkpoint(FIXTURE_MOE, tmp / "teacher-megatron", progress=False)
        student_mc = hf_to_megatron_checkpoint(student, tmp / "student-megatron", progress=False)
        gpu = torch.cuda.is_available()
        variants = {"plain transformers + PyTorch": plain_loop(FIXTURE_MOE, student, "cuda" if gpu else "cpu",
                                                               torch.bfloat16 if gpu else torch.float32, 1e-4),
                    "megatron engine (TP1)": engine_loop(teacher_mc, student_mc, tmp / "run", args, 1e-4)}
        vocab = 4096
        generator = torch.Generator().manual_seed(0)
        batches = [list(torch.randint(0, vocab, (args.micro_batch * args.micro_batches, args.seq_len),
                                      generator=generator).split(args.micro_batch)) for _ in range(args.steps)]
        for step in variants.values():  # warm-up: first-call allocations and lazy initialisation
            step(batches[0])
        best = {name: 0.0 for name in variants}
        tokens = args.steps * args.micro_batch * args.micro_batches * args.seq_len
        for _ in range(args.rounds):
            for name, step in variants.items():
                if gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for batch in batches:
                    step(batch)
                if gpu:
                    torch.cuda.synchronize()
                best[name] = max(best[name], tokens / (time.perf_counter() - start))
    plain = best["plain transformers + PyTorch"]
    print(f"\nfixture teacher (Qwen3-MoE, 4 layers, 16 experts top-2, hidden 192) -> random-FFN student; "
          f"seq {args.seq_len}, {args.micro_batches} x {args.micro_batch} sequences per step, "
          f"{'bf16 GPU' if gpu else 'fp32 CPU'}, best of {args.rounds} interleaved rounds")
    print("| variant | tokens/s | vs plain |\n|---|---|---|")
    for name, rate in best.items():
        print(f"| {name} | {rate:,.0f} | {rate / plain:.2f}x |")


if __name__ == "__main__":
    main()
