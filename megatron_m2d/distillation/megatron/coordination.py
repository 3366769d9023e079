"""The few collective decisions checkpointing needs (every rank agrees before anything is published or loaded),
written to work in one process without torch.distributed, on gloo (CPU) and on NCCL (CUDA tensors)."""

from __future__ import annotations

import sys

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def barrier() -> None:
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks_succeeded(ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank."""
    dist = _dist()
    if not dist or dist.get_world_size() == 1:
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (small Python values: paths, decisions)."""
    dist = _dist()
    if not dist or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def warn(message: str) -> None:
    """One line on stderr, from rank 0 only."""
    if rank() == 0:
        print(f"m2d: warning: {message}", file=sys.stderr, flush=True)
