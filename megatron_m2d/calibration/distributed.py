"""Calibration over several processes (torchrun): the batches are split over the ranks, every rank streams the
layers over its own batches, and the per-layer sums are added across ranks. The statistics are sums over
tokens, so the result is the single-process result (up to the order of fp64 additions); each batch is computed
exactly as one process computes it, because ranks get whole batches.

Started without torchrun (no WORLD_SIZE > 1 in the environment) everything here is a no-op for one rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Rank 0 writes the statistics directory; the others write only their own hidden-state files."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """A rank's own GPU under torchrun ('cuda' -> 'cuda:LOCAL_RANK')."""
        if self.world > 1 and device == "cuda":
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return device

    def shard(self, items: list) -> list:
        """This rank's contiguous share of `items` (sizes differ by at most one)."""
        per, extra = divmod(len(items), self.world)
        start = self.rank * per + min(self.rank, extra)
        return items[start:start + per + (self.rank < extra)]

    def sum(self, sums: dict[str, torch.Tensor]) -> None:
        """Add every tensor of `sums` across ranks, in place."""
        if self.world > 1:
            for value in sums.values():
                dist.all_reduce(value, op=dist.ReduceOp.SUM)

    def agree_min(self, value: int, device: str) -> int:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def join(device: str) -> Ranks:
    """The ranks of this torchrun job (gloo on CPU, NCCL on GPUs), or one rank without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
