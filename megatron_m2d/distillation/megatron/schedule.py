"""Optimizer and learning-rate schedule: megatron-core's, configured from the run.

AdamW through `get_megatron_optimizer` (the distributed optimizer on GPUs; TE's or apex's fused Adam when
megatron-core finds one, torch's otherwise; frozen teacher parameters never get state), and megatron-core's
OptimizerParamScheduler, which has all three shapes: linear warmup, then WSD (constant, then a linear decay over
the last --decay steps), cosine, or constant, down to --min-lr.

One scheduler step per optimizer step, taken *before* the update, so that update i (0-based) runs at the rate of
step i + 1: the first update of a warmup is not wasted at lr 0, and the last one reaches --min-lr (the HF backend's
`learning_rate` has the same endpoints).
"""

from __future__ import annotations

from megatron_m2d.distillation.megatron.config import RunConfig

DECAY_STYLES = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}


def build_optimizer(config: RunConfig, model_chunks: list, use_distributed_optimizer: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, clip_grad=config.clip_grad,
        bf16=config.precision == "bf16", params_dtype=_dtype(config),
        use_distributed_optimizer=use_distributed_optimizer)
    return get_megatron_optimizer(optimizer_config, model_chunks)


def build_scheduler(config: RunConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=config.lr, min_lr=config.min_lr, lr_warmup_steps=config.warmup_steps,
        lr_decay_steps=config.steps, lr_decay_style=DECAY_STYLES[config.schedule],
        start_wd=config.weight_decay, end_wd=config.weight_decay, wd_incr_steps=config.steps,
        wd_incr_style="constant", wsd_decay_steps=config.decay_steps, lr_wsd_decay_style="linear",
        # on resume the checkpoint's scheduler state is taken as it is (same run, same config)
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False)


def learning_rate_at(config: RunConfig, step: int) -> float:
    """The rate update `step` (0-based) runs at: what the scheduler gives after step + 1 scheduler steps. Pure
    arithmetic over megatron-core's formula (for the planner, plots and tests), no optimizer needed."""
    from types import SimpleNamespace

    groups = SimpleNamespace(param_groups=[{}])  # all the scheduler reads and writes of an optimizer
    build_scheduler(config, groups).step(step + 1)
    return groups.param_groups[0]["lr"]


def _dtype(config: RunConfig):
    import torch

    return torch.bfloat16 if config.precision == "bf16" else torch.float32
