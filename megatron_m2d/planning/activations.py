"""Bytes that autograd keeps for the backward pass of the dense student, per micro-batch, written op by op.

The accounting of Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models"),
redone for the layers we train (RMSNorm, GQA attention with optional q/k norms and rotary, SwiGLU, no dropout)
and the two layer specs the engine builds:
- `te` (Transformer Engine, the GPU path): norm fused into the next linear (keeps the norm's input, its output
  and 1/rms), flash attention (keeps q, k, v, its output and the log-sum-exp, never the s x s scores);
  with FP8 the linears keep their inputs in FP8.
- `local` (megatron-core's local spec: what runs without TE, and on CPU): torch's RMSNorm, which for the backward
  keeps its input and normalised input in fp32 (torch's composite rms_norm computes in fp32 and saves both; a
  CUDA build with a fused rms_norm keeps less); unfused attention that keeps q, the keys and values repeated to
  every query head, the softmax probabilities (also in fp32 under bf16: the softmax runs in fp32) and the mask.
Either way, each linear keeps its input (the sequence-parallel shard, which Megatron gathers again in the
backward), and SwiGLU keeps fc1's output, the offset copy of its linear half (megatron-core always adds
`glu_linear_offset`), silu's output and the product: 5 x FFN width per token.
Tensor parallelism divides everything inside attention and the FFN by TP; sequence parallelism divides the rest
(norms, the residual stream). The local-spec figures are checked against the allocations of a real megatron-core
step on CPU (tests/test_plan_measured.py); the TE figures follow the same accounting of TE's saved tensors and
await a GPU measurement.
"""

from __future__ import annotations

from megatron_m2d.planning.layout import Layout
from megatron_m2d.planning.shapes import ModelShape

FP32 = 4


def _widths(shape: ModelShape, tp: int) -> dict[str, float]:
    """Per-token widths on one TP rank: queries, one of keys/values, attention output."""
    a, g = shape.heads, shape.query_groups
    if shape.mla:  # MLA's up-projections give every head its own key and value
        g = a
    return dict(q=a * shape.qk_head_dim / tp, kv=g * shape.qk_head_dim / tp, v=g * shape.v_head_dim / tp,
                out=a * shape.v_head_dim / tp, heads=a / tp, repeated=a > g)


def norm_then_linear(width: float, layout: Layout) -> float:
    """Bytes per token: a norm and the linear that reads its output (before any parallel division)."""
    b = layout.activation_bytes
    linear_input = 1 if layout.fp8 else b
    if layout.impl == "te":
        return width * b + FP32 + width * linear_input
    return 2 * width * FP32 + FP32 + width * b


def attention_bytes(shape: ModelShape, layout: Layout, recompute: str | None) -> float:
    """Bytes per token kept by one layer's attention block after its input norm (q/k norms, rotary excluded
    (per sequence, see rotary_bytes), core attention, output projection's input)."""
    w, b, s = _widths(shape, layout.tp), layout.activation_bytes, layout.seq_len
    qkv_out = w["q"] + w["kv"] + w["v"]
    kept = 0.0
    if layout.impl == "te":
        kept += qkv_out * b  # v (and k, under a q/k norm) are views of the fused QKV output
        if shape.qk_norm:  # TE's norm keeps its input: q is a reshaped copy
            kept += w["q"] * b + (w["heads"] + w["kv"] / shape.qk_head_dim) * FP32
        kept += (w["q"] + w["kv"]) * b  # rotary outputs q, k kept by flash attention
        kept += w["out"] * b + (0 if recompute == "selective" else w["heads"] * FP32)  # output; log-sum-exp
        if layout.fp8:
            kept += w["out"]  # the output projection keeps an FP8 copy of its input
        return kept
    # local spec
    fp32_aliases = layout.precision == "fp32"  # fp32: the norm's input is the tensor itself, not an fp32 copy
    holds_qkv = (shape.qk_norm and fp32_aliases) or not w["repeated"] or recompute == "selective"
    kept += qkv_out * b if holds_qkv else 0
    if shape.qk_norm:
        groups = w["kv"] / shape.qk_head_dim
        kept += 2 * w["q"] * FP32 + w["heads"] * FP32  # q (a reshaped copy): input and x/rms, 1/rms
        kept += (0 if fp32_aliases else w["kv"] * FP32) + w["kv"] * FP32 + groups * FP32  # k: input, x/rms
    kept += w["q"] * b  # rotated q, kept by the score product
    if recompute == "selective":  # core attention recomputed: the checkpoint keeps its inputs q, k, v
        kept += w["kv"] * b
    else:
        kept += (2 * w["q"] if w["repeated"] else w["kv"]) * b  # keys (and values) repeated per query head
        kept += w["heads"] * s * (b + (FP32 if b != FP32 else 0))  # probabilities (+ the fp32 softmax result)
    return kept + w["out"] * b  # the output projection's input


def ffn_bytes(shape: ModelShape, layout: Layout) -> float:
    """Bytes per token kept by a SwiGLU FFN after its input norm: fc1 out (2f), offset copy, silu out (f each)
    and the product, fc2's input (FP8 copy instead under FP8). A one-expert MoE student (GPT-OSS) counts its
    expert's width; its router and token permutation add a few hidden-size copies, not counted."""
    f, b = shape.token_ffn_width / layout.tp, layout.activation_bytes
    return 4 * f * b + f * (1 if layout.fp8 else b)


def layer_bytes(shape: ModelShape, layout: Layout, tokens: int, recompute: str | None) -> float:
    """Bytes one decoder layer keeps for one micro-batch of `tokens` tokens (without full recompute)."""
    replicated = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    norms = 2 * norm_then_linear(shape.hidden, layout) / replicated
    per_token = norms + attention_bytes(shape, layout, recompute) + ffn_bytes(shape, layout)
    return tokens * per_token + rotary_bytes(shape, layout)


def rotary_bytes(shape: ModelShape, layout: Layout) -> float:
    """megatron-core's unfused rotary keeps cos and sin (seq x rotary dim) for q and for k in every layer."""
    dim = shape.rope_head_dim or shape.qk_head_dim
    return 4 * layout.seq_len * dim * layout.activation_bytes


def student_activations(shape: ModelShape, layout: Layout, stage: int, recompute: str | None) -> dict[str, float]:
    """Activation bytes on one rank of pipeline stage `stage`: 'kept' (all micro-batches in flight under
    1F1B: stage i holds min(PP - i, micro-batches) of them) and 'transient' (the layer recomputed in the backward
    under full recompute)."""
    tokens = layout.micro_batch * layout.seq_len
    layers = shape.layers // layout.pp
    in_flight = min(layout.pp - stage, layout.micro_batches)
    replicated = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    one_layer = layer_bytes(shape, layout, tokens, None if recompute == "full" else recompute)
    if recompute == "full":  # each layer keeps its input; one layer is rebuilt at a time in the backward
        per_layer, transient = tokens * shape.hidden * layout.activation_bytes / replicated, one_layer
    else:
        per_layer, transient = one_layer, 0.0
    kept = layers * per_layer
    if stage == 0:
        kept += tokens * 8  # token ids (int64) kept by the embedding's backward
    if stage == layout.pp - 1:  # final norm and the output layer's input (never recomputed)
        kept += tokens * norm_then_linear(shape.hidden, layout) / replicated
    kept *= in_flight
    if layout.impl == "local":
        # the score product writes into megatron-core's global memory buffer, allocated once and reused
        kept += layout.micro_batch * shape.heads / layout.tp * layout.seq_len**2 * layout.activation_bytes
        if stage == 0:
            kept += layout.seq_len**2  # the boolean causal mask the loop passes, one for all micro-batches
    return dict(kept=kept, transient=transient)
