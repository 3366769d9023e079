"""Model FLOPs per token of a distillation step: the student trained (forward + backward = 3 forwards) and the
teacher's forward. The one formula for the planner and the MFU the training loop logs.

Counted: every matrix multiply, 2 FLOPs per multiply-add: the decoder's projections, the FFN or the top-k routed
experts (and shared experts, router), the output layer, and attention's two batched products (Q K^T and P V)
over the keys a token sees under the causal mask (the mean of min(i + 1, window) over positions i, so sliding
windows count what they compute). Norms, rotary, softmax, the KD loss's softmaxes (~10 x vocabulary FLOPs per
token, < 0.01 % here) and the embedding lookup are not counted. Model FLOPs: recomputation is hardware work that
lowers the MFU a layout reaches, not FLOPs of the model (the convention of Megatron-LM and PaLM's MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_m2d.planning.shapes import ModelShape


@dataclass(frozen=True)
class ForwardFlops:
    matmul: float  # per token: projections, FFN/experts, output layer
    attention: float  # per token: Q K^T and P V

    @property
    def total(self) -> float:
        return self.matmul + self.attention


@dataclass(frozen=True)
class StepFlops:
    student_forward: ForwardFlops
    teacher_forward: ForwardFlops

    @property
    def student_training(self) -> float:
        """Forward + backward (twice the forward: gradients of inputs and of weights)."""
        return 3 * self.student_forward.total

    @property
    def total(self) -> float:
        return self.student_training + self.teacher_forward.total


def mean_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to under a causal mask (with a sliding window of `window` tokens)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0..w-1 see i + 1 keys, the remaining ones see w
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def matmul_params(shape: ModelShape, top_k: int | None = None) -> int:
    """Weights a token multiplies with: all of attention and dense FFNs, top_k routed experts, the output layer
    (norms, biases, sinks and the embedding lookup excluded)."""
    h = shape.hidden
    attention = shape.attention_matmul_params()
    k = shape.top_k if top_k is None else top_k
    total = 0
    for layer in range(shape.layers):
        total += attention
        if layer in shape.moe_layers:
            router = h * shape.experts
            shared = 3 * h * shape.shared_ffn + (h if shape.shared_gate else 0)
            total += router + shared + k * 3 * h * shape.expert_ffn
        else:
            total += 3 * h * shape.ffn
    return total + shape.vocab_rows * h


def forward_flops(shape: ModelShape, seq_len: int, top_k: int | None = None) -> ForwardFlops:
    """FLOPs of one token's forward pass at this sequence length (top_k: routed experts per token)."""
    per_key = 2 * shape.heads * (shape.qk_head_dim + shape.v_head_dim)  # Q K^T and P V, per attended key
    attention = sum(per_key * mean_context(seq_len, shape.windows[i] if shape.windows else None)
                    for i in range(shape.layers))
    return ForwardFlops(matmul=2.0 * matmul_params(shape, top_k), attention=float(attention))


def step_flops(student: ModelShape, teacher: ModelShape, seq_len: int, teacher_top_k: int | None = None) -> StepFlops:
    """Per-token FLOPs of one distillation step: the student's training and the teacher's forward."""
    return StepFlops(forward_flops(student, seq_len), forward_flops(teacher, seq_len, teacher_top_k))
