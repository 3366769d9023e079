"""Process groups of a distillation run: the student's DP x TP x PP, and the teacher's experts folded over the
data-parallel ranks of each pipeline stage (megatron-core's "MoE parallel folding": expert parallel size =
--teacher-ep, expert tensor parallel size 1, the dense student without expert parallelism).

`plan_layout` is arithmetic only (the planner and the launchers call it to check a layout in a second);
`initialize` starts torch.distributed and megatron-core's parallel state for it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_m2d.distillation.megatron.config import RunConfig
from megatron_m2d.errors import M2DError


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    dp: int  # data-parallel size of the student: the ranks left over by TP x PP
    teacher_ep: int
    micro_batch: int
    global_batch: int
    num_micro_batches: int  # per data-parallel rank and optimizer step

    def describe(self) -> str:
        return (f"{self.world} ranks = DP {self.dp} x TP {self.tp} x PP {self.pp} (teacher EP {self.teacher_ep}); "
                f"global batch {self.global_batch} = micro-batch {self.micro_batch} x {self.num_micro_batches} "
                f"micro-batches x DP {self.dp}")


def plan_layout(config: RunConfig, world: int) -> Layout:
    """The layout of `config` on `world` ranks, or a one-line M2DError saying what does not divide."""
    tp, pp, ep = config.tp, config.pp, config.teacher_ep
    if world % (tp * pp):
        raise M2DError(f"{world} ranks do not split into --tp {tp} x --pp {pp} = {tp * pp}-rank model replicas")
    dp = world // (tp * pp)
    # megatron-core carves expert-parallel groups (with expert TP 1) out of the TP x DP ranks of a stage
    if (tp * dp) % ep:
        raise M2DError(f"--teacher-ep {ep} does not divide the {tp * dp} ranks of a pipeline stage "
                       f"(TP {tp} x DP {dp}) that hold the teacher's experts")
    global_batch = config.global_batch or config.micro_batch * dp
    if global_batch % (config.micro_batch * dp):
        raise M2DError(f"--global-batch {global_batch} is not a multiple of --micro-batch {config.micro_batch} "
                       f"x data-parallel size {dp} = {config.micro_batch * dp}")
    return Layout(world, tp, pp, dp, ep, config.micro_batch, global_batch,
                  global_batch // (config.micro_batch * dp))


def device() -> torch.device:
    """This rank's device: its GPU under torchrun (LOCAL_RANK), the CPU where there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def initialize(config: RunConfig, timeout_minutes: int = 30) -> Layout:
    """torch.distributed (nccl on GPUs, gloo on CPU; from torchrun's environment, or a one-process group) and
    megatron-core's parallel state for `config`; seeds every RNG. Reuses a process group or parallel state that
    is already initialised (by a caller that owns it), provided it has this layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # a plain `python -m ...`: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    layout = plan_layout(config, dist.get_world_size())
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
        if have != (layout.tp, layout.pp, layout.teacher_ep, 1):
            raise M2DError(f"megatron-core is already initialised for TP/PP/EP/ETP {have}, the run needs "
                           f"{(layout.tp, layout.pp, layout.teacher_ep, 1)}")
    else:
        ps.initialize_model_parallel(layout.tp, layout.pp, expert_model_parallel_size=layout.teacher_ep,
                                     expert_tensor_parallel_size=1)  # left unset it follows TP (Bridge #4007)
    seed_everything(config.seed)
    return layout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Megatron-LM's convention: pipeline stages draw from different streams (seed + 100 x stage), data-parallel
    replicas from the same. The CUDA RNG tracker (tensor-parallel regions, TE) exists only with CUDA."""
    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def is_logging_rank() -> bool:
    """Global rank 0: the one rank that prints, logs and writes the run's side files."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


_CONTROL_GROUPS: dict = {}  # default process group -> its control group


def control_group(minutes: int = 360):
    """A gloo group over all ranks for waits as long as one rank's work (a HF conversion, the teacher's HF
    reference logits): NCCL's collectives would time out, and gloo needs no GPU memory."""
    import torch.distributed as dist

    world = dist.group.WORLD
    if world not in _CONTROL_GROUPS:
        _CONTROL_GROUPS.clear()  # a group of a destroyed process group is of no use
        _CONTROL_GROUPS[world] = dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes))
    return _CONTROL_GROUPS[world]


def rank_where(flag: bool) -> int:
    """The lowest global rank on which `flag` holds (every rank calls it)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    lowest = torch.tensor([dist.get_rank() if flag else dist.get_world_size()])
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=control_group())
    return int(lowest)


def on_one_rank(work, rank: int = 0):
    """work() on global rank `rank`, its result (or its M2DError, raised on every rank) given to all ranks."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    box = [None, None]
    if dist.get_rank() == rank:
        try:
            box[0] = work()
        except M2DError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=rank, group=control_group())
    if box[1] is not None:
        raise M2DError(box[1])
    return box[0]
