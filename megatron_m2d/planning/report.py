"""The plan as a reader sees it (a text table) and as a program reads it (JSON)."""

from __future__ import annotations

from megatron_m2d.planning.layout import GiB
from megatron_m2d.planning.plan import Plan


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:.1f} days"


def format_plan(plan: Plan) -> str:
    layout, memory, acc = plan.layout, plan.memory, plan.accelerator
    lines = [f"teacher  {plan.teacher.describe()}", f"student  {plan.student.describe()}",
             f"layout   {layout.gpus} x {acc.name}: {layout.describe()}", ""]
    stage = f" (fullest pipeline stage: {memory.stage + 1} of {layout.pp})" if layout.pp > 1 else ""
    lines.append(f"memory per GPU{stage}".ljust(64) + "GiB")
    for part in memory.parts:
        lines.append(f"  {part.label}".ljust(64) + f"{part.gib:6.2f}")
    verdict = (f"fits, {(acc.memory - memory.total) / GiB:.1f} GiB free" if plan.fits else
               f"DOES NOT FIT by {(memory.total - acc.memory) / GiB:.1f} GiB")
    lines.append(f"  total of {acc.memory / GiB:.1f}".ljust(64) + f"{memory.total / GiB:6.2f}  {verdict}")
    modes = ", ".join(f"{mode} {value / GiB:.2f}" for mode, value in memory.activations_by_recompute.items())
    lines.append(f"  student activations by recompute (GiB): {modes}")
    if not plan.fits:
        lines.append(f"  the largest part is {plan.overflowing}")
        if plan.fix:
            fix = plan.fix
            changed = [f"{p.label.split(' (')[0]} {memory.part(p.key).gib:.1f} -> {p.gib:.1f}"
                       for p in fix.memory.parts if abs(p.bytes - _bytes_of(memory, p.key)) > 0.5 * GiB]
            lines.append(f"  smallest change that fits: {' '.join(fix.changes)} -> {fix.memory.total / GiB:.1f} GiB"
                         + (f" ({'; '.join(changed)})" if changed else ""))
        else:
            lines.append("  no change of up to four settings fits: use a larger GPU or a smaller student")
    f = plan.flops
    lines += ["", "compute (model FLOPs per token)",
              f"  student training  {f.student_training / 1e9:7.2f} GFLOP  (3 x forward: matmuls "
              f"{f.student_forward.matmul / 1e9:.2f} + attention {f.student_forward.attention / 1e9:.2f})",
              f"  teacher forward   {f.teacher_forward.total / 1e9:7.2f} GFLOP  (matmuls "
              f"{f.teacher_forward.matmul / 1e9:.2f} + attention {f.teacher_forward.attention / 1e9:.2f})",
              f"  total             {f.total / 1e9:7.2f} GFLOP",
              f"  at {plan.mfu:.0%} MFU of {acc.peak_flops / 1e12:.0f} TFLOP/s: "
              f"{plan.tokens_per_second_per_gpu / 1e3:.1f} k tokens/s per GPU, "
              f"{plan.tokens_per_second_per_gpu * layout.gpus / 1e3:.0f} k tokens/s in all",
              f"  {plan.tokens / 1e9:.2f} B tokens = {plan.steps:,} steps: {_hours(plan.seconds)} on "
              f"{layout.gpus} GPUs, {plan.gpu_hours:,.0f} GPU-hours"]
    return "\n".join(lines)


def _bytes_of(memory, key: str) -> float:
    return next((p.bytes for p in memory.parts if p.key == key), 0.0)


def plan_to_dict(plan: Plan) -> dict:
    """Everything the table shows, in bytes, FLOPs and seconds."""
    memory = plan.memory
    out = {
        "accelerator": plan.accelerator.name, "accelerator_memory": plan.accelerator.memory,
        "layout": {k: getattr(plan.layout, k) for k in plan.layout.__dataclass_fields__} | {
            "dp": plan.layout.dp, "micro_batches": plan.layout.micro_batches},
        "student_params": plan.student.total_params(), "teacher_params": plan.teacher.total_params(),
        "memory": {"stage": memory.stage, "parts": {p.key: p.bytes for p in memory.parts}, "total": memory.total,
                   "activations_by_recompute": memory.activations_by_recompute},
        "fits": plan.fits,
        "flops_per_token": {"student_training": plan.flops.student_training,
                            "teacher_forward": plan.flops.teacher_forward.total, "total": plan.flops.total},
        "mfu": plan.mfu, "tokens": plan.tokens, "steps": plan.steps,
        "tokens_per_second_per_gpu": plan.tokens_per_second_per_gpu, "seconds": plan.seconds,
        "gpu_hours": plan.gpu_hours,
    }
    if not plan.fits:
        out["largest_part"] = plan.overflowing
        out["fix"] = None if plan.fix is None else {"changes": list(plan.fix.changes),
                                                    "total": plan.fix.memory.total}
    return out
