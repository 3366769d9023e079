"""The all-token Gram (--gram): every expert on every calibration token, at the speed of the device's GEMMs.

Per chunk of tokens: the family's `expert_outputs` runs every expert on the chunk, one expert at a time (its
gate/up GEMM, the experts module's own gate, its down GEMM writing straight into the chunk's [E, n, H] buffer),
and ONE GEMM gives the chunk's E x E Gram (K = tokens x hidden), accumulated in fp32 and added to an fp64 running
sum (see chunk_gram for how a CPU's bf16 GEMM returns it). Chunks are as long as the shapes and the free memory
allow, so the GEMMs are large enough to run near the device's ceiling. The same code runs on a GPU.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from megatron_m2d.families.experts import expert_outputs

# Fewer rows than this and the GEMMs fall off the ceiling (measured on this CPU; GPUs want as many).
MIN_CHUNK_TOKENS = 512
MIN_CHUNK_BYTES = 64 * 2**20  # small experts: fewer, longer chunks (each costs E small GEMMs' dispatch)
FREE_MEMORY_SHARE = 4  # a chunk never takes more than a quarter of the free memory


def chunk_gram(rows: torch.Tensor) -> torch.Tensor:
    """rows @ rows.T as ONE GEMM accumulating in fp32, returned in fp32. CUDA writes bf16 products straight into an
    fp32 result (out_dtype). A CPU's bf16 GEMM also accumulates in fp32 but rounds its result to bf16: once per
    chunk and entry (2^-9 relative, unbiased, then summed over chunks in fp64). Widening the rows to fp32 instead
    would cost more than the expert pass itself on this CPU (a conversion pass over E x n x H values, and fp32
    GEMMs of this shape at a fraction of the bf16 rate), so bf16 rows are multiplied as they are; fp16 rows are
    widened (their GEMM could overflow)."""
    if rows.dtype != torch.float32 and rows.is_cuda:
        try:
            return torch.mm(rows, rows.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without out_dtype for this dtype
            pass
    if rows.dtype == torch.float16:
        rows = rows.float()
    return (rows @ rows.T).float()


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def chunk_tokens(experts: nn.Module, hidden: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk. The chunk's [E, n, H] outputs (and their fp32 copy where the Gram widens fp16) take about
    as much memory as the layer's expert weights, so the Gram pass keeps the peak near two layers, or MIN_CHUNK_BYTES
    where the experts are small; at least MIN_CHUNK_TOKENS rows for the GEMMs, at most a share of the free memory."""
    per_token = experts.num_experts * hidden * (torch.finfo(dtype).bits // 8 + (4 if dtype == torch.float16 else 0))
    weights = sum(p.numel() * p.element_size() for p in experts.parameters())
    tokens = max(max(weights, MIN_CHUNK_BYTES) // per_token, MIN_CHUNK_TOKENS)
    return max(1, min(tokens, available_bytes(device) // FREE_MEMORY_SHARE // per_token))


@torch.no_grad()
def add_all_expert_gram(sums: dict[str, torch.Tensor], experts: nn.Module, x: torch.Tensor,
                        workspace: dict[str, torch.Tensor]) -> None:
    """sums['gram'] += sum_t <E_i(x_t), E_j(x_t)>, sums['out_sum_all'] += sum_t E_i(x_t), over x [T, H].
    `workspace` keeps the chunk buffer from one batch to the next: a fresh one per batch had its pages faulted in
    again every time (a quarter of the pass on the 8-layer random shape of benchmarks/bench_calibrate.py)."""
    E, (T, H) = experts.num_experts, x.shape
    step = min(chunk_tokens(experts, H, x.dtype, x.device), T)
    buffer = workspace.get("chunk")
    if buffer is None or buffer.numel() < E * step * H or buffer.dtype != x.dtype:
        buffer = workspace["chunk"] = x.new_empty(E * step * H)
    chunk_sum = torch.empty(E, H, dtype=torch.float32, device=x.device)
    for start in range(0, T, step):
        chunk = x[start:start + step]
        outputs = expert_outputs(experts, chunk, out=buffer[:E * chunk.shape[0] * H].view(E, -1, H))  # [E, n, H]
        for expert in range(E):  # per expert: a reduction over the middle axis of [E, n, H] runs ~3x slower
            torch.sum(outputs[expert], 0, dtype=torch.float32, out=chunk_sum[expert])
        sums["gram"] += chunk_gram(outputs.view(E, -1)).to(sums["gram"].device, torch.float64)
        sums["out_sum_all"] += chunk_sum.to(sums["gram"].device, torch.float64)


def gram_flops(num_experts: int, hidden: int, width: int, tokens: int) -> int:
    """Multiply-adds x 2 of the Gram pass: every expert's three projections and the E x E Gram, per token."""
    return 2 * tokens * num_experts * (3 * hidden * width + num_experts * hidden)
