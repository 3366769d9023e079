"""Test-only patches that let megatron-core run on CPU with gloo (never shipped: see environment.md).

megatron-core assumes CUDA in a few places that a forward pass on CPU reaches:
- rotary embeddings move their frequencies to torch.cuda.current_device();
- attention forks the CUDA RNG tracker (for dropout, which is 0 here);
- the default causal mask is built on device "cuda" (avoided by passing an explicit mask);
- 0.16.1 only: the MoE router names `te_general_gemm`, defined only when Transformer Engine imports;
- the distributed-checkpoint writer calls torch.cuda.synchronize() after its host copies.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_cpu_patches(setattr_=setattr) -> None:
    """The patches, for a process of our own (a spawned rank) or through pytest's monkeypatch.setattr."""
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    setattr_(torch.cuda, "current_device", lambda: "cpu")
    setattr_(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    setattr_(tp_random.CudaRNGStatesTracker, "fork", contextlib.contextmanager(lambda self, name=None: (yield)))
    if not hasattr(moe_utils, "te_general_gemm"):
        setattr(moe_utils, "te_general_gemm", None)


def tp_logits_worker(rank: int, world: int, port: int, checkpoint: str, ids_path: str, out_path: str,
                     expert_parallel: bool = False) -> None:
    """One rank of a parallel forward: load an m2d Megatron checkpoint at TP=world (or EP=world with
    expert_parallel), save rank 0's logits."""
    import json

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from transformers import AutoConfig

    from megatron_m2d.convert.megatron_model import build_gpt_model

    apply_cpu_patches()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if expert_parallel:
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    else:
        parallel_state.initialize_model_parallel(world, 1)
    meta = json.loads((Path(checkpoint) / "m2d_convert.json").read_text())
    values = dict(meta["hf_config"])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = build_gpt_model(config, parallel_output=False)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint), strict=False)
    model.eval()
    ids = torch.load(ids_path, weights_only=True)
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids),
                       attention_mask=causal_mask(ids.shape[1]))
    if rank == 0:
        torch.save(logits, out_path)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def megatron_cpu(monkeypatch):
    """A single-process gloo group with tensor/pipeline parallel size 1, and the CPU patches applied."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state

    apply_cpu_patches(monkeypatch.setattr)
    monkeypatch.setenv("M2D_ALLOW_CPU_CHECKPOINT_WRITE", "1")  # the writer's CUDA sync is patched above
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def causal_mask(length: int) -> torch.Tensor:
    """Megatron's mask convention: True where attention is NOT allowed."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None, None]
