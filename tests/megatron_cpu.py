"""Test-only patches that let megatron-core run on CPU with gloo (never shipped: see environment.md).

megatron-core assumes CUDA in a few places that a forward pass on CPU reaches:
- rotary embeddings move their frequencies to torch.cuda.current_device();
- attention forks the CUDA RNG tracker (for dropout, which is 0 here);
- the default causal mask is built on device "cuda" (avoided by passing an explicit mask);
- 0.16.1 only: the MoE router names `te_general_gemm`, defined only when Transformer Engine imports.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def megatron_cpu(monkeypatch):
    """A single-process gloo group with tensor/pipeline parallel size 1, and the CPU patches applied."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(tp_random.CudaRNGStatesTracker, "fork",
                        contextlib.contextmanager(lambda self, name=None: (yield)))
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
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
