"""The two ways of running a distillation step that bench_distill.py compares, each able to time its parts.

Both run the same step on the same shapes: the teacher's forward (no graph), the student's forward and backward,
the loss (T^2 forward KL + LM cross-entropy, combined by kd_weight) forward and backward, and the optimizer step.
- PlainLoop: what the plain transformers + PyTorch way does (distillation/hf.py's step): HF models, the KL over
  the full vocabulary in fp32, torch's AdamW (fused on CUDA).
- MegatronEngine: our engine (distillation/megatron): megatron-core models from `m2d convert` checkpoints,
  modelopt's distillation wrapper, the token-chunked KD loss, megatron-core's optimizer and schedule.
A part is timed alone on the step's shapes (`parts`), the whole step as the training loop runs it (`step`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def token_batch(vocab: int, micro_batch: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (micro_batch, seq_len), generator=torch.Generator().manual_seed(seed))


class PlainLoop:
    name = "plain transformers + PyTorch"

    def __init__(self, teacher_dir, student_dir, device, dtype, micro_batches: int, temperature=1.0, kd_weight=1.0):
        from transformers import AutoModelForCausalLM

        self.device, self.micro_batches = device, micro_batches
        self.temperature, self.kd_weight = temperature, kd_weight
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval()
        self.student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype).to(device).train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-5, fused=device.type == "cuda")

    def loss(self, logits, teacher_logits, ids):
        from megatron_m2d.distillation.hf import kd_loss

        kd = kd_loss(logits, teacher_logits, self.temperature).mean()
        lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return self.kd_weight * kd + (1 - self.kd_weight) * lm

    def step(self, ids_per_micro_batch: list[torch.Tensor]) -> None:
        """One optimizer step over the micro-batches (gradient accumulation), as hf.py runs it."""
        for ids in ids_per_micro_batch:
            ids = ids.to(self.device)
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=ids).logits
            logits = self.student(input_ids=ids).logits
            (self.loss(logits, teacher_logits, ids) / len(ids_per_micro_batch)).backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def parts(self, ids: torch.Tensor, repeats: int) -> dict[str, float]:
        """Seconds per micro-batch of each part (the optimizer: per step)."""
        ids = ids.to(self.device)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids).logits
            student_logits = self.student(input_ids=ids).logits
        grad = torch.randn_like(student_logits)

        def teacher_forward():
            with torch.no_grad():
                self.teacher(input_ids=ids)

        def student_forward_backward():
            self.student(input_ids=ids).logits.backward(grad)

        def kd_loss():
            logits = student_logits.detach().requires_grad_()
            self.loss(logits, teacher_logits, ids).backward()

        out = dict(teacher_forward=timed(teacher_forward, self.device, repeats),
                   student_forward_backward=timed(student_forward_backward, self.device, repeats),
                   kd_loss=timed(kd_loss, self.device, repeats))
        out["optimizer"] = timed(self.optimizer.step, self.device, repeats)
        self.optimizer.zero_grad(set_to_none=True)
        return out


class MegatronEngine:
    name = "megatron_m2d (megatron-core)"

    def __init__(self, config, device):
        """`config`: a RunConfig naming the teacher and student (HF or `m2d convert` directories) and the
        layout; the process group and megatron-core's parallel state are set up here (one process is enough)."""
        from megatron_m2d.distillation.megatron.inputs import megatron_checkpoints
        from megatron_m2d.distillation.megatron.loop import build_engine
        from megatron_m2d.distillation.megatron.parallel import initialize

        self.config, self.device = config, device
        self.layout = initialize(config)
        student_dir, teacher_dir = megatron_checkpoints(config)
        self.engine = build_engine(config, self.layout, student_dir, teacher_dir, device)
        self.models = self.engine.models

    def _batch(self, ids: torch.Tensor) -> dict:
        from megatron_m2d.distillation.megatron.loss import IGNORE_INDEX

        ids = ids.to(self.device)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        return {"tokens": ids, "labels": labels, "loss_mask": torch.ones(ids.shape, device=self.device),
                "position_ids": torch.arange(ids.shape[1], device=self.device).expand_as(ids).contiguous()}

    def step(self, ids_per_micro_batch: list[torch.Tensor]) -> None:
        from megatron_m2d.distillation.megatron.loop import train_step

        train_step(self.engine, iter([self._batch(ids) for ids in ids_per_micro_batch]))

    def parts(self, ids: torch.Tensor, repeats: int) -> dict[str, float]:
        from megatron_m2d.distillation.megatron.loop import attention_mask
        from megatron_m2d.distillation.megatron.loss import kd_and_lm_per_token, micro_batch_loss

        batch = self._batch(ids)
        tokens, positions = batch["tokens"], batch["position_ids"]
        mask = attention_mask(tokens.shape[1], self.device, self.models.uses_te)
        chunk, distillation = self.models.chunks[0], self.models.distillation
        with torch.no_grad():
            logits = self.models.teacher(tokens, positions, mask)  # [b, s, V_shard]
        teacher_logits = logits.transpose(0, 1).reshape(-1, logits.shape[-1]).contiguous()
        grad, student_logits = torch.randn_like(logits), torch.randn_like(teacher_logits)
        labels, loss_mask = batch["labels"].t().reshape(-1), batch["loss_mask"].t().reshape(-1)

        def teacher_forward():
            with torch.no_grad():
                self.models.teacher(tokens, positions, mask)

        def student_forward_backward():
            with distillation.only_student_forward():
                chunk(tokens, positions, mask).backward(grad)

        def kd_loss():
            student = student_logits.detach().requires_grad_()
            kd, lm = kd_and_lm_per_token(student, teacher_logits, labels, self.config.temperature,
                                         self.models.vocab_size)
            micro_batch_loss(kd, lm, labels, loss_mask, self.config.kd_weight)[0].backward()

        out = dict(teacher_forward=timed(teacher_forward, self.device, repeats),
                   student_forward_backward=timed(student_forward_backward, self.device, repeats),
                   kd_loss=timed(kd_loss, self.device, repeats))
        out["optimizer"] = timed(self.engine.optimizer.step, self.device, repeats)
        return out

    def close(self) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
