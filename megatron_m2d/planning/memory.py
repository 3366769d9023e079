"""Per-GPU memory of a distillation step under a layout, component by component, on the fullest pipeline stage.

Student training state, bytes per parameter on a rank (Megatron's accounting, docs "distributed optimizer"):
bf16 weights 2 + fp32 gradient buffer 4 (Megatron-LM accumulates and reduces bf16 gradients in fp32) + fp32
master weights and Adam's two moments 12, the last divided over the DP ranks by the distributed optimizer
(6 + 12/DP); fp32 training: 4 + 4 + 8 (no master copy). FP8 adds TE's cached FP8 weight and its transpose
(2 bytes per GEMM weight). The teacher is frozen: bf16 weights only, its dense parts split by TP and PP like the
student's, its routed experts whole on each of `teacher_ep` ranks (expert-tensor-parallel size 1).

Transient working sets are counted at their peak, all at once (a conservative sum): the teacher's forward of one
layer (no graph: nothing is kept), and on the last stage the logits and the KD loss: student and teacher logits
(bf16, this rank's vocabulary shard, as the output layers return them to modelopt's hooks), the logits' gradient,
and the loss's fp32 chunks (distillation/megatron/loss.py: token chunks of at most 1/8 of one model's logits and
64 MiB; forward and backward hold up to five at once), never a full-vocabulary fp32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_m2d.planning.activations import student_activations
from megatron_m2d.planning.layout import GiB, Layout
from megatron_m2d.planning.shapes import ModelShape

KD_LOSS_CHUNKS = 5  # fp32 chunks the KD loss holds at once at most (loss.py)


@dataclass(frozen=True)
class Part:
    key: str
    label: str
    bytes: float

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass(frozen=True)
class StageMemory:
    stage: int
    parts: tuple[Part, ...]
    activations_by_recompute: dict  # recompute mode -> kept + transient activation bytes

    @property
    def total(self) -> float:
        return sum(p.bytes for p in self.parts)

    def part(self, key: str) -> Part:
        return next(p for p in self.parts if p.key == key)


def stage_layers(shape: ModelShape, pp: int, stage: int) -> range:
    per_stage = shape.layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def rank_params(shape: ModelShape, layout: Layout, stage: int, ep: int = 1) -> dict[str, float]:
    """Parameters one rank of `stage` holds: 'dense' (split by TP, norms replicated), 'experts' (routed experts,
    E / ep whole experts per MoE layer), 'gemm' (the dense ones that are matrix weights)."""
    tp, h = layout.tp, shape.hidden
    norms_per_layer = 2 * h + (2 * shape.qk_head_dim if shape.qk_norm else 0)
    dense = experts = 0.0
    for layer in stage_layers(shape, layout.pp, stage):
        layer_dense, layer_experts = shape.layer_params(layer)
        dense += (layer_dense - norms_per_layer) / tp + norms_per_layer
        experts += layer_experts / ep
    gemm = dense - len(stage_layers(shape, layout.pp, stage)) * norms_per_layer
    if stage == 0:
        dense += shape.embedding_params / tp
    if stage == layout.pp - 1:
        output = shape.output_params - h if not shape.tied else (shape.embedding_params if layout.pp > 1 else 0)
        dense += output / tp + h
        gemm += output / tp
    return dict(dense=dense, experts=experts, gemm=gemm)


def training_state(params: float, gemm_params: float, layout: Layout) -> list[Part]:
    if layout.precision == "fp32":
        weights, grads, optimizer, what = 4, 4, 8, "Adam m, v in fp32"
    else:
        weights, grads, optimizer, what = 2, 4, 12, "fp32 master + Adam m, v"
    share = layout.dp if layout.use_distributed_optimizer else 1
    parts = [Part("student_weights", f"student weights ({layout.precision})", params * weights),
             Part("student_grads", "student gradients (fp32 buffer)", params * grads),
             Part("optimizer", f"optimizer states ({what}" + (f", 1/{share} each)" if share > 1 else ")"),
                  params * optimizer / share)]
    if layout.fp8:
        parts.insert(1, Part("fp8_weights", "FP8 weight copies (TE: weight + transpose)", 2 * gemm_params))
    return parts


def logits_bytes(shape: ModelShape, layout: Layout) -> float:
    """One model's logits for one micro-batch on one rank (vocabulary split over TP), in the activation dtype."""
    return layout.micro_batch * layout.seq_len * shape.vocab_rows / layout.tp * layout.activation_bytes


def kd_loss_chunk_bytes(shape: ModelShape, layout: Layout) -> float:
    """One fp32 chunk of the KD loss: whole rows of this rank's vocabulary shard, sized as loss.py sizes it."""
    from megatron_m2d.distillation.megatron.loss import default_chunk_bytes

    shard = shape.vocab_rows // layout.tp
    tokens = layout.micro_batch * layout.seq_len
    target = default_chunk_bytes(logits_bytes(shape, layout))
    rows = min(tokens, max(1, target // (4 * shard)))
    return rows * shard * 4


def teacher_working_set(teacher: ModelShape, layout: Layout, top_k: int) -> float:
    """Peak bytes of one teacher layer's forward for one micro-batch (no_grad: freed layer by layer). Attention:
    q, k, v and output (+ the s x s scores and fp32 softmax in the local spec). MoE with the allgather dispatcher:
    the tokens of the TP x EP group gathered (T x EP per rank), the T x k token copies routed to this rank's
    experts under balanced routing (a skewed router sends more), their fc1 and SwiGLU outputs, fp32 routing
    probabilities, the gathered outputs."""
    b, tokens, tp, ep = layout.activation_bytes, layout.micro_batch * layout.seq_len, layout.tp, layout.teacher_ep
    a = teacher.heads / tp
    attention = tokens * (3 * a * teacher.qk_head_dim + a * teacher.v_head_dim) * b
    if layout.impl == "local":
        attention += tokens * a * layout.seq_len * (2 * b + 4)
    moe = 0.0
    if teacher.is_moe:
        routed = tokens * top_k
        moe = (2 * tokens * ep * teacher.hidden + 2 * routed * teacher.hidden + 4 * routed * teacher.expert_ffn) * b
        moe += tokens * ep * teacher.experts * 5  # fp32 probabilities + boolean routing map
        moe += tokens * 3 * teacher.shared_ffn * b
    dense_ffn = tokens * 5 * teacher.ffn / tp * b if len(teacher.moe_layers) < teacher.layers else 0.0
    hidden = 2 * tokens * teacher.hidden * b  # the layer's input and output
    return hidden + max(attention, moe, dense_ffn)


def stage_memory(student: ModelShape, teacher: ModelShape, layout: Layout, stage: int,
                 reserve: float) -> StageMemory:
    s = rank_params(student, layout, stage)  # the student has no expert parallelism (a one-expert one neither)
    t = rank_params(teacher, layout, stage, ep=layout.teacher_ep)
    parts = training_state(s["dense"] + s["experts"], s["gemm"] + s["experts"], layout)
    acts = {mode: student_activations(student, layout, stage, mode) for mode in (None, "selective", "full")}
    chosen = acts[layout.recompute]
    in_flight = min(layout.pp - stage, layout.micro_batches)
    parts.append(Part("activations", f"student activations ({in_flight} micro-batch"
                      f"{'es' if in_flight > 1 else ''} in flight, recompute {layout.recompute or 'none'})",
                      chosen["kept"] + chosen["transient"]))
    experts_here = teacher.experts // layout.teacher_ep if teacher.is_moe else 0
    parts.append(Part("teacher_weights", "teacher weights (bf16" + (
        f", {experts_here} of {teacher.experts} experts per GPU)" if experts_here else ")"),
        (t["dense"] + t["experts"]) * 2))
    top_k = layout.teacher_top_k or teacher.top_k
    parts.append(Part("teacher_forward", "teacher forward working set (one layer, transient)",
                      teacher_working_set(teacher, layout, top_k)))
    if stage == layout.pp - 1:
        one = logits_bytes(student, layout)
        parts.append(Part("logits", "logits and KD loss (student, teacher, gradient, loss chunks)",
                          3 * one + KD_LOSS_CHUNKS * kd_loss_chunk_bytes(student, layout)))
    parts.append(Part("reserve", "reserve (CUDA context, NCCL, workspaces, fragmentation)", reserve))
    by_mode = {mode or "none": v["kept"] + v["transient"] for mode, v in acts.items()}
    return StageMemory(stage, tuple(parts), by_mode)


def memory_plan(student: ModelShape, teacher: ModelShape, layout: Layout, reserve: float) -> StageMemory:
    """The fullest pipeline stage's memory (every stage is computed; PP = 1 has one)."""
    stages = [stage_memory(student, teacher, layout, i, reserve) for i in range(layout.pp)]
    return max(stages, key=lambda m: m.total)
