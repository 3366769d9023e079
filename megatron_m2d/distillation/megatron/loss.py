"""The distillation loss over the tensor-parallel-sharded vocabulary, in bounded memory.

Per token: kd = T^2 KL(softmax(z_t / T) || softmax(z_s / T)) and lm = cross-entropy of the next token, both over
the real vocabulary only (the rows conversion pads to a multiple of 128 never enter a softmax). A micro-batch's
loss is kd_weight x mean(kd) + (1 - kd_weight) x mean(lm), the means taken over its tokens exactly as the HF
backend (distillation/hf.py) takes them, so the two backends give the same number on the same batch.

Why written here rather than taken from nvidia-modelopt: its LogitsKLLoss (the formula we check against) casts
the whole [tokens, vocab] logits of both models to fp32 and keeps several such tensors for backward: at 4,096
tokens x 151,936 vocab that is ~2.5 GB per tensor. This one walks the tokens in chunks, keeps only three fp32
log-normalisers per token for backward, and recomputes each chunk's softmaxes there; its peak beyond the logits is
the bf16 gradient plus a few fp32 chunks. modelopt's machinery still drives it (DistillationModel's hooks and
compute_kd_loss call `ChunkedKDLoss` as the criterion of the output layers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

IGNORE_INDEX = -100  # a position without a next token (HF's convention)
# One fp32 [chunk, vocab shard] tensor (forward and backward hold up to five at once): at most 1/8 of one model's
# logits, so the loss's peak beyond the logits stays under 2x those logits (the bf16 gradient is 1x) at any size,
# and at most 64 MiB (larger chunks gain nothing on a GPU).
CHUNK_BYTES_MAX, CHUNK_FRACTION = 64 << 20, 8


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _global_logsumexp(local: Tensor, group) -> Tensor:
    """log sum over the whole vocabulary of exp(x), from each rank's logsumexp over its shard ([rows, k])."""
    top = _all_reduce(local.clone(), dist.ReduceOp.MAX, group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + _all_reduce((local - top).exp(), dist.ReduceOp.SUM, group).log()


def _local_logsumexp(x: Tensor) -> Tensor:
    return torch.logsumexp(x, dim=-1) if x.shape[-1] else x.new_full(x.shape[:-1], float("-inf"))


class _KDAndLM(torch.autograd.Function):
    """(student [N, V_shard], teacher [N, V_shard], labels [N]) -> per-token (kd, lm) in fp32, chunked over N."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, vocab_start, valid, group, chunk_rows):
        n = student.shape[0]
        kd, lm = student.new_empty(n, dtype=torch.float32), student.new_empty(n, dtype=torch.float32)
        lse = student.new_empty(n, 3, dtype=torch.float32)  # student at T, teacher at T, student at 1
        for r0 in range(0, n, chunk_rows):
            rows = slice(r0, min(n, r0 + chunk_rows))
            zs, zt = _fp32_copy(student[rows, :valid]), _fp32_copy(teacher[rows, :valid])
            here, index = _labels_here(labels[rows], vocab_start, valid)
            target = torch.where(here, zs.gather(1, index[:, None]).squeeze(1), 0.0) if valid else here.float()
            lse_1 = _local_logsumexp(zs)
            zs.div_(temperature), zt.div_(temperature)
            local = torch.stack([_local_logsumexp(zs), _local_logsumexp(zt), lse_1], dim=1)
            lse[rows] = _global_logsumexp(local, group)
            zs.sub_(lse[rows, 0:1]), zt.sub_(lse[rows, 1:2])  # log p_s, log p_t
            zs.sub_(zt).neg_()  # log p_t - log p_s
            zt.exp_()  # p_t
            kl = torch.bmm(zt[:, None, :], zs[:, :, None]).view(-1)  # no [rows, vocab] product tensor
            del zs, zt
            sums = _all_reduce(torch.stack([kl, target], dim=1), dist.ReduceOp.SUM, group)
            kd[rows] = sums[:, 0] * temperature**2
            lm[rows] = torch.where(labels[rows] != IGNORE_INDEX, lse[rows, 2] - sums[:, 1], 0.0)
        ctx.save_for_backward(student, teacher, labels, lse)
        ctx.settings = (temperature, vocab_start, valid, chunk_rows)
        return kd, lm

    @staticmethod
    def backward(ctx, grad_kd, grad_lm):
        student, teacher, labels, lse = ctx.saved_tensors
        temperature, vocab_start, valid, chunk_rows = ctx.settings
        grad = torch.zeros_like(student)  # padded columns stay zero
        grad_lm = torch.where(labels != IGNORE_INDEX, grad_lm, 0.0)
        for r0 in range(0, student.shape[0], chunk_rows):
            rows = slice(r0, min(student.shape[0], r0 + chunk_rows))
            if not valid:
                continue
            zs, zt = _fp32_copy(student[rows, :valid]), _fp32_copy(teacher[rows, :valid])
            p_t = zt.div_(temperature).sub_(lse[rows, 1:2]).exp_()
            p_s_t = (zs / temperature).sub_(lse[rows, 0:1]).exp_()
            p_s = zs.sub_(lse[rows, 2:3]).exp_()
            # d(T^2 KL)/dz_s = T (p_s(T) - p_t(T));  d(CE)/dz_s = p_s - onehot(label)
            g = p_s_t.sub_(p_t).mul_(grad_kd[rows, None] * temperature).add_(p_s.mul_(grad_lm[rows, None]))
            here, index = _labels_here(labels[rows], vocab_start, valid)
            g.scatter_add_(1, index[:, None], torch.where(here, -grad_lm[rows], 0.0)[:, None])
            grad[rows, :valid] = g
            del zs, zt, p_t, p_s_t, p_s, g  # before the next chunk's copies are made
        return grad, None, None, None, None, None, None, None


def _fp32_copy(x: Tensor) -> Tensor:
    """A fresh fp32 tensor (x.float() returns x itself when x is fp32, and the chunk is worked on in place)."""
    return x.to(torch.float32, copy=True)


def _labels_here(labels: Tensor, vocab_start: int, valid: int) -> tuple[Tensor, Tensor]:
    """Which labels fall in this rank's shard, and their column there (0 for the others)."""
    here = (labels >= vocab_start) & (labels < vocab_start + valid)
    return here, torch.where(here, labels - vocab_start, 0)


def default_chunk_bytes(logits_bytes: int) -> int:
    """Bytes of one fp32 chunk for logits of `logits_bytes` (this rank's shard): see CHUNK_FRACTION. The
    planner (planning/memory.py) sizes the loss's memory with this too."""
    return min(CHUNK_BYTES_MAX, int(logits_bytes) // CHUNK_FRACTION)


def kd_and_lm_per_token(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float, vocab_size: int,
                        tp_rank: int = 0, group=None, chunk_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-token T^2 x forward KL and next-token cross-entropy (0 where labels == IGNORE_INDEX), fp32 [N] each.

    student, teacher: [N, V_shard] logits of this tensor-parallel rank (rank `tp_rank` of `group`, holding global
    vocabulary rows tp_rank x V_shard ...); vocab_size: the real vocabulary (rows beyond it are padding).
    Identical values on every rank of `group`; the gradient reaches the student's shard only."""
    shard = student.shape[-1]
    if teacher.shape != student.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    vocab_start = tp_rank * shard
    valid = max(0, min(shard, vocab_size - vocab_start))
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(student.numel() * student.element_size())
    # from the shard's width, not its real columns: every rank of the group must walk the same chunks, since each
    # chunk is a collective (the last rank's shard holds the padding and fewer real columns)
    chunk_rows = max(1, chunk_bytes // (4 * shard))
    return _KDAndLM.apply(student, teacher.detach(), labels, float(temperature), vocab_start, valid, group,
                          chunk_rows)


def micro_batch_loss(kd: Tensor, lm: Tensor, labels: Tensor, loss_mask: Tensor, kd_weight: float):
    """(loss, kd mean, lm mean) of one micro-batch: kd averaged over its tokens (loss_mask), lm over those that
    have a next token; as the HF backend averages them."""
    mask = loss_mask.float()
    lm_mask = mask * (labels != IGNORE_INDEX)
    kd_mean = (kd * mask).sum() / mask.sum().clamp(min=1)
    lm_mean = (lm * lm_mask).sum() / lm_mask.sum().clamp(min=1)
    return kd_weight * kd_mean + (1 - kd_weight) * lm_mean, kd_mean, lm_mean


def chunked_kd_criterion(model_config, temperature: float, vocab_size: int):
    """The criterion modelopt's DistillationModel calls with the output layers' captured logits ([s, b, V_shard],
    as megatron-core's output layer returns them) and `labels` [b, s]; returns per-token (kd, lm), each [b, s]."""
    from megatron.core import parallel_state
    from modelopt.torch.distill.plugins.megatron import BaseLoss

    class ChunkedKDLoss(BaseLoss):
        def forward(self, predictions, targets, labels=None):
            student, teacher = self.pre_forward(predictions, targets)  # unwraps (logits, bias), detaches teacher
            s, b, shard = student.shape
            labels = (torch.full((b, s), IGNORE_INDEX, device=student.device) if labels is None else labels)
            kd, lm = kd_and_lm_per_token(
                student.reshape(s * b, shard), teacher.reshape(s * b, shard), labels.t().reshape(-1),
                temperature, vocab_size, parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_group())
            return kd.view(s, b).t(), lm.view(s, b).t()

    return ChunkedKDLoss(model_config)
