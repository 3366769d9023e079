"""A distillation run's parallel layout and settings as the planner sees them, and the accelerators it knows.

Field names are the run config's (`m2d distill --backend megatron`, ENGINE.md); `gpus` is the world size, which
the launcher, not the run config, decides. Parallel folding as the engine sets it up: the dense student runs
TP x PP x DP with DP = gpus / (TP x PP); the teacher shares TP and PP and spreads its experts over `teacher_ep`
ranks with expert-tensor-parallel size 1 (whole experts per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_m2d.planning.shapes import ModelShape

GiB = 1024**3


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory: int  # bytes
    peak_flops: float  # dense bf16 tensor-core FLOP/s (MFU is stated against it, FP8 runs included)


# memory: what torch.cuda.get_device_properties().total_memory reports (rounded down to 0.1 GiB)
ACCELERATORS = {
    "h100": Accelerator("H100 80GB", int(79.1 * GiB), 989.4e12),
    "h200": Accelerator("H200 141GB", int(139.8 * GiB), 989.4e12),
    "a100": Accelerator("A100 80GB", int(79.1 * GiB), 312e12),
}


@dataclass(frozen=True)
class Layout:
    gpus: int
    seq_len: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int = 1
    tp: int = 1
    pp: int = 1
    teacher_ep: int = 1
    precision: str = "bf16"  # bf16 | fp32
    fp8: str | None = None  # None | hybrid | e4m3 (the student's GEMMs; the teacher stays bf16)
    recompute: str | None = None  # None | selective | full
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    teacher_top_k: int | None = None  # experts per token the teacher runs (None: as trained)
    impl: str = "te"  # te: Transformer Engine spec (flash attention); local: megatron-core's local spec

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on each data-parallel rank (gradient accumulation)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def with_changes(self, **changes) -> "Layout":
        return replace(self, **changes)

    def describe(self) -> str:
        opt = "distributed optimizer" if self.use_distributed_optimizer else "optimizer replicated per DP rank"
        sp = " + SP" if self.sequence_parallel and self.tp > 1 else ""
        return (f"TP {self.tp}{sp} x PP {self.pp} x DP {self.dp}, teacher EP {self.teacher_ep}; micro-batch "
                f"{self.micro_batch} x {self.micro_batches} micro-batches x DP {self.dp} = {self.global_batch} "
                f"sequences of {self.seq_len} ({self.tokens_per_step / 1e6:.2f} M tokens) per step; "
                f"{self.precision}{' + FP8 ' + self.fp8 if self.fp8 else ''}, recompute "
                f"{self.recompute or 'none'}, {opt}, {self.impl} layer spec")


POSITIVE = ("gpus", "seq_len", "global_batch", "micro_batch", "tp", "pp", "teacher_ep")


def layout_problems(layout: Layout, student: ModelShape, teacher: ModelShape) -> list[str]:
    """Why this layout cannot run these models (the engine refuses the same); empty when it can."""
    out = [f"--{name.replace('_', '-')} must be >= 1, got {getattr(layout, name)}" for name in POSITIVE
           if getattr(layout, name) < 1]
    if out:
        return out
    if layout.precision not in ("bf16", "fp32"):
        out.append(f"--precision {layout.precision}: bf16 or fp32")
    if layout.recompute not in (None, "selective", "full"):
        out.append(f"--recompute {layout.recompute}: none, selective or full")
    if layout.impl not in ("te", "local"):
        out.append(f"--impl {layout.impl}: te or local")
    if layout.fp8 and layout.impl != "te":
        out.append("FP8 needs Transformer Engine (--impl te)")
    if layout.sequence_parallel and layout.tp > 1 and layout.impl == "local":
        out.append("sequence parallelism needs Transformer Engine's norms (megatron-core's local spec uses "
                   "torch's, which refuse it)")
    if layout.gpus % (layout.tp * layout.pp):
        out.append(f"{layout.gpus} GPUs are not a multiple of TP {layout.tp} x PP {layout.pp}")
    elif layout.global_batch % (layout.micro_batch * layout.dp):
        out.append(f"global batch {layout.global_batch} is not a multiple of micro-batch {layout.micro_batch} x "
                   f"DP {layout.dp}")
    if layout.gpus % (layout.teacher_ep * layout.pp):
        out.append(f"teacher EP {layout.teacher_ep} x PP {layout.pp} does not divide {layout.gpus} GPUs")
    for role, shape in (("student", student), ("teacher", teacher)):
        if shape.heads % layout.tp or shape.query_groups % layout.tp:
            out.append(f"TP {layout.tp} does not divide the {role}'s {shape.heads} heads / "
                       f"{shape.query_groups} key-value groups")
        if shape.vocab_rows % layout.tp:
            out.append(f"TP {layout.tp} does not divide the {role}'s padded vocabulary {shape.vocab_rows}")
        if shape.layers % layout.pp:
            out.append(f"PP {layout.pp} does not divide the {role}'s {shape.layers} layers")
    if teacher.experts and teacher.experts % layout.teacher_ep:
        out.append(f"teacher EP {layout.teacher_ep} does not divide its {teacher.experts} experts")
    if layout.teacher_top_k is not None and not 1 <= layout.teacher_top_k <= max(teacher.experts, 1):
        out.append(f"--teacher-top-k {layout.teacher_top_k} is outside 1..{teacher.experts}")
    return out
