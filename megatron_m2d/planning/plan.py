"""A run's plan: per-GPU memory, FLOPs per token, time and GPU-hours; for a layout that does not fit, the
smallest change that does.

    plan = make_plan(student, teacher, layout, ACCELERATORS["h100"], mfu=0.4, tokens=4e9)
    print(format_plan(plan))
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from megatron_m2d.errors import M2DError
from megatron_m2d.planning.flops import StepFlops, step_flops
from megatron_m2d.planning.layout import GiB, Accelerator, Layout, layout_problems
from megatron_m2d.planning.memory import StageMemory, memory_plan
from megatron_m2d.planning.shapes import ModelShape

DEFAULT_RESERVE = 4 * GiB


@dataclass(frozen=True)
class Fix:
    changes: tuple[str, ...]  # the flags that change, e.g. ("--teacher-ep 8",)
    layout: Layout
    memory: StageMemory


@dataclass(frozen=True)
class Plan:
    student: ModelShape
    teacher: ModelShape
    layout: Layout
    accelerator: Accelerator
    mfu: float
    tokens: float  # the token budget
    memory: StageMemory
    flops: StepFlops
    fix: Fix | None  # when it does not fit: the smallest change that does (None if none was found)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.accelerator.memory

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.layout.tokens_per_step)

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.mfu * self.accelerator.peak_flops / self.flops.total

    @property
    def seconds(self) -> float:
        return self.steps * self.layout.tokens_per_step / (self.tokens_per_second_per_gpu * self.layout.gpus)

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.layout.gpus / 3600

    @property
    def overflowing(self) -> str:
        """The largest part of the memory: the one a fix has to shrink (reserve excluded)."""
        return max((p for p in self.memory.parts if p.key != "reserve"), key=lambda p: p.bytes).label


def make_plan(student: ModelShape, teacher: ModelShape, layout: Layout, accelerator: Accelerator, mfu: float,
              tokens: float, reserve: float = DEFAULT_RESERVE) -> Plan:
    problems = layout_problems(layout, student, teacher)
    if problems:
        raise M2DError("; ".join(problems))
    if not 0 < mfu <= 1:
        raise M2DError(f"--mfu must lie in (0, 1], got {mfu}")
    if not tokens > 0:
        raise M2DError(f"the token budget must be > 0, got {tokens}")
    memory = memory_plan(student, teacher, layout, reserve)
    flops = step_flops(student, teacher, layout.seq_len, layout.teacher_top_k)
    fix = None
    if memory.total > accelerator.memory:
        fix = smallest_fix(student, teacher, layout, accelerator, reserve)
    return Plan(student, teacher, layout, accelerator, mfu, tokens, memory, flops, fix)


# ---- the smallest change that fits --------------------------------------------------------------------------

def _moves(layout: Layout, teacher: ModelShape):
    """(flag, cost, layout) of single changes that lower memory, cheapest first in spirit: costs rank what a
    change does to throughput (sharding the optimizer and spreading experts are nearly free; recompute costs a
    share of the compute; more model parallelism costs communication; more GPUs cost money)."""
    if not layout.use_distributed_optimizer:
        yield "--use-distributed-optimizer", 0.1, layout.with_changes(use_distributed_optimizer=True)
    if layout.tp > 1 and not layout.sequence_parallel:
        yield "--sequence-parallel", 0.2, layout.with_changes(sequence_parallel=True)
    if teacher.is_moe and layout.teacher_ep * 2 <= teacher.experts:
        ep = layout.teacher_ep * 2
        yield f"--teacher-ep {ep}", 0.5, layout.with_changes(teacher_ep=ep)
    if layout.micro_batch > 1:
        yield f"--micro-batch {layout.micro_batch // 2}", 0.6, layout.with_changes(micro_batch=layout.micro_batch // 2)
    if layout.recompute is None:
        yield "--recompute selective", 0.8, layout.with_changes(recompute="selective")
    if layout.recompute != "full":
        yield "--recompute full", 2.0, layout.with_changes(recompute="full")
    yield f"--tp {layout.tp * 2}", 1.5, layout.with_changes(tp=layout.tp * 2, sequence_parallel=True)
    yield f"--pp {layout.pp * 2}", 1.5, layout.with_changes(pp=layout.pp * 2)
    yield f"{layout.gpus * 2} GPUs", 3.0, layout.with_changes(gpus=layout.gpus * 2)


def smallest_fix(student: ModelShape, teacher: ModelShape, layout: Layout, accelerator: Accelerator,
                 reserve: float, max_changes: int = 4) -> Fix | None:
    """The cheapest combination of up to `max_changes` moves that fits (uniform-cost search; ties: less memory).
    Flags that change the same setting twice are reported once, with the final value."""
    start = (0.0, 0, (), layout)
    queue, seen, counter = [start], {layout}, 1
    while queue:
        cost, _, changes, current = heapq.heappop(queue)
        if changes:
            memory = memory_plan(student, teacher, current, reserve)
            if memory.total <= accelerator.memory:
                return Fix(_merge_flags(changes), current, memory)
        if len(changes) == max_changes:
            continue
        for flag, step_cost, candidate in _moves(current, teacher):
            if candidate in seen or layout_problems(candidate, student, teacher):
                continue
            seen.add(candidate)
            heapq.heappush(queue, (cost + step_cost, counter, changes + (flag,), candidate))
            counter += 1
    return None


def _merge_flags(changes: tuple[str, ...]) -> tuple[str, ...]:
    """['--teacher-ep 2', '--teacher-ep 4'] -> ['--teacher-ep 4'], order of first appearance kept."""
    final: dict[str, str] = {}
    for flag in changes:
        name = flag.split()[0] if flag.startswith("--") else flag.split()[1]
        final[name] = flag
    return tuple(final.values())
