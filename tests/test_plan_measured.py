"""`m2d plan`'s parameter and activation terms against what a real megatron-core step allocates on CPU.

How it is measured: a tiny dense student (the class densify writes) is built as megatron-core's GPTModel with
the local layer spec, exactly as the engine builds it (`build_gpt_model`, padded vocabulary, bf16 runs with
`bf16=True` so the softmax runs in fp32), under the CPU patches of tests/megatron_cpu.py. PyTorch's profiler
records every allocation and free of the CPU allocator (megatron_m2d.testing.allocations); replaying them gives
- the weights: bytes allocated by building the model and still live after it (parameters and buffers);
- the activations: bytes still live after the training-mode forward (token ids, mask and the autograd graph's
  saved tensors) minus the logits it returns (the plan counts those with the KD loss).
The issue asks for 10 %; the formulas are exact for this implementation, so the tolerance is 3 %: a torch or
megatron-core upgrade that changes what autograd keeps fails here and the accounting must follow it.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_m2d.planning.activations import student_activations
from megatron_m2d.planning.layout import Layout
from megatron_m2d.planning.memory import rank_params
from megatron_m2d.planning.shapes import ModelShape
from tests.megatron_cpu import causal_mask, free_port, megatron_cpu  # noqa: F401  (fixture)

TOLERANCE = 0.03

# (dense model type, sizes, precision, recompute): GQA with q/k norms (Qwen3), plain multi-head attention with a
# vocabulary that needs padding (Llama), GQA with qkv biases (Qwen2); no recompute, selective and full
CASES = [
    ("qwen3", dict(hidden=256, heads=4, groups=2, head_dim=64, ffn=768, layers=2, vocab=4096), "fp32", None),
    ("qwen3", dict(hidden=256, heads=4, groups=2, head_dim=64, ffn=768, layers=2, vocab=4096), "bf16", None),
    ("qwen3", dict(hidden=256, heads=4, groups=2, head_dim=64, ffn=768, layers=2, vocab=4096), "bf16", "selective"),
    ("qwen3", dict(hidden=256, heads=4, groups=2, head_dim=64, ffn=768, layers=2, vocab=4096), "fp32", "full"),
    ("llama", dict(hidden=256, heads=4, groups=4, head_dim=64, ffn=512, layers=3, vocab=1000), "bf16", None),
    ("qwen2", dict(hidden=192, heads=6, groups=2, head_dim=32, ffn=640, layers=2, vocab=2048), "fp32", "selective"),
]


def dense_config(model_type: str, sizes: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
                                intermediate_size=sizes["ffn"], num_hidden_layers=sizes["layers"],
                                num_attention_heads=sizes["heads"], num_key_value_heads=sizes["groups"],
                                head_dim=sizes["head_dim"], tie_word_embeddings=False, max_position_embeddings=1024)


def recompute_fields(recompute: str | None) -> dict:
    """TransformerConfig fields of a recompute mode, as the engine sets them."""
    if recompute == "selective":
        return dict(recompute_granularity="selective")
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def measure_step(config, layout: Layout) -> dict:
    """Weights and activations one rank allocates (needs megatron-core's parallel state at layout.tp)."""
    from megatron_m2d.convert.dense_mapping import padded_vocab
    from megatron_m2d.convert.megatron_model import build_gpt_model
    from megatron_m2d.convert.parallel import ParallelSizes
    from megatron_m2d.testing.allocations import AllocationTrace

    torch.manual_seed(0)
    dtype = torch.bfloat16 if layout.precision == "bf16" else torch.float32
    overrides = dict(recompute_fields(layout.recompute), bf16=layout.precision == "bf16")
    batch, seq = layout.micro_batch, layout.seq_len
    with AllocationTrace() as trace:
        trace.mark("start")
        model = build_gpt_model(config, dtype, ParallelSizes(tp=layout.tp), vocab_rows=padded_vocab(config),
                                use_te=False, config_overrides=overrides).to(dtype)  # as Float16Module casts
        trace.mark("built")
        model.train()
        trace.mark("forward_start")
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
        logits = model(ids, positions, attention_mask=causal_mask(seq))
        if torch.distributed.is_initialized():
            # Under load, one or two all-reduced [b, s, h] activations (256 KiB each) were still live at the mark,
            # released a moment later by gloo's side (the TP test failed once in CI at -3.4 %). A barrier, which
            # gloo runs after the all-reduces queued before it, let 22 runs on an overloaded machine measure alike.
            torch.distributed.barrier()
        trace.mark("forward_end")
    kept = trace.live("forward_end") - trace.live("forward_start") - logits.numel() * logits.element_size()
    return dict(weights=trace.live("built") - trace.live("start"), activations=kept)


def planned(config, layout: Layout) -> dict:
    shape = ModelShape.from_hf_config(config)
    weight_bytes = 2 if layout.precision == "bf16" else 4
    return dict(weights=rank_params(shape, layout, stage=0)["dense"] * weight_bytes,
                activations=student_activations(shape, layout, stage=0, recompute=layout.recompute)["kept"])


def assert_close(plan: dict, measured: dict) -> None:
    for term in ("weights", "activations"):
        error = plan[term] / measured[term] - 1
        assert abs(error) < TOLERANCE, f"{term}: plan {plan[term]:,.0f} B, measured {measured[term]:,} B " \
                                       f"({error:+.1%})"


@pytest.mark.parametrize("model_type,sizes,precision,recompute", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3] or 'none'}" for c in CASES])
def test_plan_matches_a_real_megatron_step(megatron_cpu, model_type, sizes, precision, recompute):  # noqa: F811
    config = dense_config(model_type, sizes)
    layout = Layout(gpus=1, seq_len=256, global_batch=2, micro_batch=2, precision=precision, recompute=recompute,
                    impl="local")
    assert_close(planned(config, layout), measure_step(config, layout))


def _tensor_parallel_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state

    from tests.megatron_cpu import apply_cpu_patches

    apply_cpu_patches()
    torch._dynamo.config.disable = True  # a process of our own: nothing to restore
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world, 1)
    try:
        config = dense_config("qwen3", CASES[0][1])
        layout = Layout(gpus=world, tp=world, seq_len=256, global_batch=2, micro_batch=2, precision="bf16",
                        impl="local")
        if rank == 0:
            with open(out, "w") as f:
                json.dump(dict(plan=planned(config, layout), measured=measure_step(config, layout)), f)
        else:
            measure_step(config, layout)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_plan_matches_a_tensor_parallel_rank(tmp_path):
    """TP 2 on two gloo processes: what one rank holds and keeps (attention and FFN split, norms replicated)."""
    pytest.importorskip("megatron.core")
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.json"
    mp.spawn(_tensor_parallel_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert_close(result["plan"], result["measured"])


def test_logits_and_kd_loss_term_bounds_the_real_loss(tmp_path):
    """The plan's logits term (student and teacher logits, the logits' gradient, five fp32 loss chunks) against
    the peak of the engine's KD loss (forward and backward) over real logits, in a fresh process (so nothing
    allocated before the trace is freed inside it). It is an upper bound (the loss holds up to five chunks, three
    in this run), within 10 % when the logits dominate."""
    import subprocess
    import sys

    probe = """
import json, sys, torch
from megatron_m2d.distillation.megatron.loss import kd_and_lm_per_token
from megatron_m2d.testing.allocations import AllocationTrace
tokens, vocab = 1024, 32000
with AllocationTrace() as trace:
    trace.mark("start")
    student = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(tokens, vocab, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,))
    kd, lm = kd_and_lm_per_token(student, teacher, labels, 1.0, vocab)
    (kd.mean() + lm.mean()).backward()
    trace.mark("end")
print(json.dumps({"peak": trace.peak("start", "end") - trace.live("start")}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
    from megatron_m2d.planning.memory import KD_LOSS_CHUNKS, kd_loss_chunk_bytes, logits_bytes

    shape = ModelShape(name="x", layers=1, hidden=64, heads=1, query_groups=1, qk_head_dim=64, v_head_dim=64,
                       ffn=64, vocab_rows=32000)
    layout = Layout(gpus=1, seq_len=1024, global_batch=1, micro_batch=1)
    planned = 3 * logits_bytes(shape, layout) + KD_LOSS_CHUNKS * kd_loss_chunk_bytes(shape, layout)
    assert measured <= planned and measured > 0.9 * planned, (measured, planned)
