"""Test-only patches that let megatron-core run on CPU with gloo (never shipped: see environment.md).

megatron-core assumes CUDA in a few places that a forward pass on CPU reaches:
- rotary embeddings move their frequencies to torch.cuda.current_device();
- attention forks the CUDA RNG tracker (for dropout, which is 0 here);
- the default causal mask is built on device "cuda" (avoided by passing an explicit mask);
- 0.16.1 only: the MoE router names `te_general_gemm`, defined only when Transformer Engine imports;
- the sliding-window mask (GPT-OSS) is built on device "cuda";
- 0.19: the MoE router's gating GEMM is a custom autograd function that queries CUDA device properties;
- megatron-core creates the DeepSeek-V3 router's expert bias on torch.cuda.current_device();
- megatron-core's own distributed-checkpoint writer (used by tests that compare formats) calls
  torch.cuda.synchronize() after its host copies;
- activation recompute (tensor_parallel.checkpoint) saves and restores the CUDA RNG state around each recomputed
  block: on CPU the CPU generator is the only state there is, so that is what is saved and restored;
- the optimizer, gradient clipping, DDP's gradient buffers and the pipeline schedules create small tensors
  (scales, norms, token counts) with device="cuda": those modules see a `torch` whose factories put them on the CPU;
- gradient clipping asserts that every gradient is a torch.cuda.FloatTensor before scaling it;
- without Transformer Engine or apex, the local spec's torch norm refuses sequence parallelism (which a MoE
  teacher under TP needs): here it accepts it and marks its weights `sequence_parallel`, as TE's and apex's norms
  do, so finalize_model_grads sums their gradients over the tensor-parallel ranks. (`__new__` comes back as the
  same function; Python looks it up alike whether or not it is wrapped in staticmethod.)
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


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


class _TorchOnCpu:
    """`torch` as a megatron-core module that creates tensors on device "cuda" sees it: the same module, but its
    tensor factories put such tensors on the CPU."""

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name not in _FACTORIES:
            return value

        def factory(*args, **kwargs):
            if "device" in kwargs and str(kwargs["device"]).startswith("cuda"):
                kwargs["device"] = "cpu"
            return value(*args, **kwargs)

        return factory


def _modules_creating_cuda_tensors():
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core import utils
    from megatron.core.pipeline_parallel import schedules

    return (optimizer, clip_grads, param_and_grad_buffer, schedules, utils)


def _clip_grads_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 (same coefficient), without its CUDA type assertion."""
    coefficient = max_norm / (total_norm + 1.0e-6)
    if coefficient < 1.0:
        for param in parameters:
            grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
            if grad is not None:
                grad.detach().mul_(coefficient)


def _torch_norm_under_sequence_parallel(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
    norm_class = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
    norm = norm_class(normalized_shape=hidden_size, eps=eps)
    for param in norm.parameters():
        setattr(param, "sequence_parallel", config.sequence_parallel)
    return norm


def apply_cpu_patches(setattr_=setattr) -> None:
    """The patches, for a process of our own (a spawned rank) or through pytest's monkeypatch.setattr."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils, router

    setattr_(torch.cuda, "current_device", lambda: "cpu")
    setattr_(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    setattr_(tp_random.CudaRNGStatesTracker, "fork", contextlib.contextmanager(lambda self, name=None: (yield)))
    for module in _modules_creating_cuda_tensors():
        setattr_(module, "torch", _TorchOnCpu())
    from megatron.core.optimizer import optimizer
    from megatron.core.transformer import torch_norm

    setattr_(optimizer, "clip_grad_by_total_norm_fp32", _clip_grads_on_cpu)
    setattr_(torch_norm.WrappedTorchNorm, "__new__", staticmethod(_torch_norm_under_sequence_parallel))
    if not hasattr(moe_utils, "te_general_gemm"):
        setattr(moe_utils, "te_general_gemm", None)
    if hasattr(fused_softmax, "get_sliding_window_causal_mask"):  # builds its mask on device "cuda"
        def window_mask(sq, skv, window_size):
            m = torch.ones(sq, skv, dtype=torch.bool)
            return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])

        setattr_(fused_softmax, "get_sliding_window_causal_mask", window_mask)
    setattr_(tp_random, "_get_all_rng_states", lambda: (torch.get_rng_state(), None, {}))
    setattr_(tp_random, "_set_all_rng_states", lambda cpu_state, cuda_state, tracker: torch.set_rng_state(cpu_state))
    if hasattr(router, "router_gating_linear"):  # 0.19: a custom autograd function that asks for CUDA
        setattr_(router, "router_gating_linear", lambda inp, weight, bias, dtype: torch.nn.functional.linear(
            inp.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)))


def parallel_worker(rank: int, world: int, port: int, task: dict) -> None:
    """One rank of a multi-process run on gloo. With task["hf"]: convert it to task["checkpoint"] at
    task["sizes"], each rank writing its shard. Otherwise: load task["checkpoint"] at task["sizes"] (resharding)
    and save the logits of task["ids"] to task["logits"] (PP: stage to stage by hand, since Megatron's pipeline
    schedules allocate on CUDA)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from megatron_m2d.convert.parallel import ParallelSizes
    from megatron_m2d.convert.provider import load_checkpoint, model_provider

    apply_cpu_patches()
    torch._dynamo.config.disable = True  # a process of our own: nothing to restore
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sizes = ParallelSizes(**task["sizes"])
    try:
        if task.get("hf"):
            hf_to_megatron_checkpoint(task["hf"], task["checkpoint"], sizes)
            return
        parallel_state.initialize_model_parallel(sizes.tp, sizes.pp, expert_model_parallel_size=sizes.ep)
        model = model_provider(task["checkpoint"], params_dtype=torch.float32, parallel_output=False,
                               use_te=False)()
        load_checkpoint(model, task["checkpoint"])
        model.eval()
        ids = torch.load(task["ids"], weights_only=True)
        positions, mask = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids), causal_mask(ids.shape[1])
        with torch.no_grad():
            if sizes.pp == 1:
                output = model(ids, positions, attention_mask=mask)
            elif parallel_state.is_pipeline_first_stage():
                dist.send(model(ids, positions, attention_mask=mask).contiguous(), rank + 1)
            else:
                hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
                dist.recv(hidden, rank - 1)
                model.set_input_tensor(hidden)
                output = model(ids, positions, attention_mask=mask)
        if rank == (world - 1 if sizes.pp > 1 else 0):
            torch.save(output, task["logits"])
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_parallel(world: int, **task) -> None:
    import torch.multiprocessing as mp

    mp.spawn(parallel_worker, args=(world, free_port(), {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in task.items()}), nprocs=world, join=True)


def _gloo_rank(rank: int, world: int, port: int, target, args: tuple) -> None:
    """One rank of run_gloo: the CPU patches, a gloo group of `world`, then target(rank, world, *args)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    apply_cpu_patches()
    torch._dynamo.config.disable = True  # a process of our own: nothing to restore
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_gloo(world: int, target, *args) -> None:
    """target(rank, world, *args) on `world` spawned gloo processes; `target` must be a module-level function
    (spawn pickles it by name) and `args` picklable. A failure on any rank fails the call."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(world, free_port(), target, args), nprocs=world, join=True)


@pytest.fixture
def megatron_cpu(monkeypatch):
    """A single-process gloo group with tensor/pipeline parallel size 1, and the CPU patches applied."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state

    apply_cpu_patches(monkeypatch.setattr)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    # 0.19 compiles routing helpers and dynamo fails on CPU there. torch's own config.patch restores the key:
    # monkeypatch.setattr cannot, since dynamo's config keys are not module attributes (pytest >= 9.2 deletes
    # such an attribute on undo instead of restoring it)
    try:
        with torch._dynamo.config.patch(disable=True):
            yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def causal_mask(length: int) -> torch.Tensor:
    """Megatron's mask convention: True where attention is NOT allowed."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None, None]
