"""The distillation step and validation around megatron-core's pipeline schedules.

What the megatron-core wheel lacks (Megatron-LM's megatron.training is not in it), written small: an optimizer
step = one call of `get_forward_backward_func()` over the step's micro-batches (1F1B across pipeline stages,
gradient accumulation, DDP's gradient reduction in `finalize_model_grads`), the optimizer's step and the loss
averaged over micro-batches and data-parallel ranks for the log. The run around it (data, checkpoints, logging)
is in run.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from megatron_m2d.distillation.megatron.config import RunConfig
from megatron_m2d.distillation.megatron.loss import micro_batch_loss
from megatron_m2d.distillation.megatron.models import Models, build_models, use_distributed_optimizer
from megatron_m2d.distillation.megatron.parallel import Layout
from megatron_m2d.distillation.megatron.schedule import build_optimizer, build_scheduler
from megatron_m2d.errors import M2DError

LOSS_KEYS = ("loss", "kd_loss", "lm_loss")


@dataclass
class Engine:
    config: RunConfig
    layout: Layout
    models: Models
    optimizer: object
    scheduler: object
    device: torch.device


def build_engine(config: RunConfig, layout: Layout, student_dir, teacher_dir, device: torch.device) -> Engine:
    from megatron.core.distributed import finalize_model_grads

    models = build_models(config, layout, student_dir, teacher_dir, device)
    optimizer = build_optimizer(config, models.chunks, use_distributed_optimizer(config))
    scheduler = build_scheduler(config, optimizer)
    # what the schedules call back: the DDP gradient reduction, the loss scale, and DDP's no_sync for all
    # micro-batches but the last
    models.student_config.finalize_model_grads_func = finalize_model_grads
    models.student_config.grad_scale_func = optimizer.scale_loss
    models.student_config.no_sync_func = models.chunks[0].no_sync
    return Engine(config, layout, models, optimizer, scheduler, device)


@lru_cache(maxsize=4)
def attention_mask(length: int, device, uses_te: bool) -> torch.Tensor | None:
    """Megatron's causal mask (True = masked). Transformer Engine's attention builds its own; megatron-core's
    local attention would build one on device "cuda", so it gets this one, on the batch's device."""
    if uses_te:
        return None
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def _forward_step(engine: Engine):
    models, device = engine.models, engine.device

    def forward_step(data_iterator, model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        mask = attention_mask(batch["tokens"].shape[1], device, models.uses_te)
        # labels make megatron-core return the (skipped) LM loss instead of a transposed copy of the logits;
        # the criterion reads the output layers' logits through modelopt's hooks
        output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])

        def loss_func(output_tensor):
            losses = models.distillation.compute_kd_loss(skip_balancer=True, labels=batch["labels"])
            kd, lm = next(iter(losses.values()))
            loss, kd_mean, lm_mean = micro_batch_loss(kd, lm, batch["labels"], batch["loss_mask"],
                                                      engine.config.kd_weight)
            # (a copy: the schedule divides the returned loss in place by the number of micro-batches)
            return loss, {"loss": loss.detach().clone(), "kd_loss": kd_mean.detach(), "lm_loss": lm_mean.detach()}

        return output, loss_func

    return forward_step


def _run_schedule(engine: Engine, batches, forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from modelopt.torch.distill.plugins.megatron import get_tensor_shapes_adjust_fn_for_distillation

    layout, seq_len = engine.layout, engine.config.seq_len
    shapes = dict(seq_length=seq_len, micro_batch_size=layout.micro_batch, decoder_seq_length=None)
    return get_forward_backward_func()(
        forward_step_func=_forward_step(engine), data_iterator=batches, model=engine.models.chunks,
        num_microbatches=layout.num_micro_batches, forward_only=forward_only,
        # pipeline stages send student and teacher activations together (modelopt widens the shapes)
        adjust_tensor_shapes_fn=get_tensor_shapes_adjust_fn_for_distillation(
            engine.models.chunks, **shapes), **shapes)


def train_step(engine: Engine, batches) -> dict:
    """One optimizer step over the next global batch from `batches` (this rank's micro-batch iterator). Returns
    the loss, KD loss and LM loss averaged over the global batch, the gradient norm before clipping and the lr."""
    engine.scheduler.step(1)  # the rate of this update (schedule.py)
    for chunk in engine.models.chunks:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    records = _run_schedule(engine, batches, forward_only=False)
    updated, grad_norm, _ = engine.optimizer.step()
    values = mean_over_data_parallel(records, engine.device)
    if not updated:  # fp32/bf16 training has no loss scaler to skip a step: megatron found non-finite gradients
        raise M2DError(f"non-finite gradients at step {engine.scheduler.num_steps}")
    return dict(values, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                lr=float(engine.optimizer.param_groups[0]["lr"]))


def evaluate(engine: Engine, batches, iterations: int) -> dict:
    """Loss, KD loss and LM loss over `iterations` global batches, nothing updated."""
    for chunk in engine.models.chunks:
        chunk.eval()
    records = []
    try:
        with torch.no_grad():
            for _ in range(iterations):
                records += _run_schedule(engine, batches, forward_only=True)
    finally:
        for chunk in engine.models.chunks:
            chunk.train()
    return mean_over_data_parallel(records, engine.device)


def mean_over_data_parallel(records: list[dict], device) -> dict:
    """The micro-batch records' mean (they exist on the last pipeline stage; every tensor-parallel rank holds the
    same values) averaged over data-parallel ranks, on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    values = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
    if records:
        values += torch.stack([torch.stack([r[k].double() for k in LOSS_KEYS]) for r in records]).mean(0)
    if dist.is_initialized():
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())  # the other stages add zeros
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        values /= ps.get_data_parallel_world_size()
    return dict(zip(LOSS_KEYS, values.tolist()))
