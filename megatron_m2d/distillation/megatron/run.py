"""A whole distillation run (`m2d distill --backend megatron`, `python -m megatron_m2d.distillation.megatron`).

    checks      the run config, then the teacher/student pair from their configs (nothing written yet)
    start       process groups (parallel.py), HF inputs converted once (inputs.py), models, optimizer (loop.py)
    teacher     its logits compared with its HF checkpoint's (teacher_check.py)
    resume      from the newest complete checkpoint under <out>/checkpoints (checkpointing.py)
    train       one global batch per step from the consumed-samples sampler (data.py); validation KD and LM loss
                every --eval-every steps; a checkpoint every --save-every steps and at the end; metrics.py logs
    export      the final student as a HF directory <out>/model (export.py)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_m2d.distillation.megatron.config import RunConfig
from megatron_m2d.errors import M2DError


def run(config: RunConfig) -> dict:
    """Distil as `config` says; started again with the same config, it resumes. Returns a summary (on every
    rank). Process groups it created are destroyed again, also on errors."""
    import torch.distributed as dist

    owns_process_group = not dist.is_initialized()
    try:
        return _run(config.validate())
    finally:
        if owns_process_group and dist.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def _run(config: RunConfig) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_m2d.distillation.megatron.inputs import describe, megatron_checkpoints
    from megatron_m2d.distillation.megatron.loop import build_engine, evaluate, train_step
    from megatron_m2d.distillation.megatron.models import check_pair
    from megatron_m2d.distillation.megatron.parallel import device, initialize, is_logging_rank, plan_layout
    from megatron_m2d.distillation.megatron.teacher_check import check_teacher

    check_pair(config, describe(config, "student"), describe(config, "teacher"))
    plan_layout(config, dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1")))
    if not megatron_core_runs_here():
        raise M2DError("the Megatron backend needs a CUDA GPU (megatron-core puts tensors on the current CUDA "
                       "device); without one, use --backend hf")
    layout = initialize(config)
    # resolved, as checkpoints and the model card record them
    config = config.with_overrides({"global_batch": layout.global_batch, "warmup": config.warmup_steps})
    rank0, out = is_logging_rank(), Path(config.out)
    student_dir, teacher_dir = megatron_checkpoints(config)
    engine = build_engine(config, layout, student_dir, teacher_dir, device())
    say = print if rank0 else (lambda *args, **kwargs: None)
    say(layout.describe(), flush=True)
    if config.check_teacher:
        say(check_teacher(engine.models.teacher, teacher_dir, engine.models.vocab_size, layout.tp,
                          config.teacher_top_k, engine.device, engine.models.uses_te), flush=True)

    from megatron_m2d.distillation.megatron import checkpointing, data, metrics

    root = out / "checkpoints"
    state = checkpointing.load_latest_checkpoint(root, engine.models.chunks, engine.optimizer, engine.scheduler,
                                                 config) or checkpointing.TrainState()
    if rank0:  # the resolved settings beside the checkpoints (each checkpoint holds its own copy)
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "run_config.json")
    tokenizer = data.megatron_tokenizer(student_dir)
    train, valid = data.build_datasets(config, tokenizer)
    sampler = dict(micro_batch=layout.micro_batch, dp_rank=ps.get_data_parallel_rank(), dp_size=layout.dp,
                   vocab_size=tokenizer.vocab_size)
    batches = data.MicroBatches(train, state.consumed_train_samples, **sampler)
    logger = metrics.MetricsLogger(
        out, config, rank0, start_step=state.step, world_size=dist.get_world_size(),
        flops_per_token=metrics.flops_per_token(student_dir, teacher_dir, config.seq_len, config.teacher_top_k),
        peak=metrics.peak_tflops(given=config.peak_tflops))
    checkpoint = None
    try:
        for step in range(state.step + 1, config.steps + 1):
            values = train_step(engine, batches)
            metrics.check_finite(step, values)
            state.step, state.consumed_train_samples = step, batches.consumed_samples
            state.tokens += layout.global_batch * config.seq_len
            state.record_train(values)  # the last values, and a window of losses for the model card
            logger.progress(step)
            if step % config.log_every == 0 or step == config.steps:
                logger.log_train(step, values)
            if valid is not None and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                valid_batches = data.MicroBatches(valid, state.consumed_valid_samples, **sampler)
                state.valid = evaluate(engine, valid_batches, config.eval_iters)
                state.consumed_valid_samples = valid_batches.consumed_samples
                logger.log_valid(step, state.valid)
            if step % config.save_every == 0 or step == config.steps:
                checkpoint = checkpointing.save_checkpoint(root, step, engine.models.chunks, engine.optimizer,
                                                           engine.scheduler, state, config, student_dir)
    finally:
        logger.close()
    if checkpoint is None and state.step:  # resumed after the last step: nothing trained, the export still due
        from megatron_m2d.distillation.megatron.checkpoint_files import complete_checkpoints

        checkpoint = complete_checkpoints(root)[-1]
    model = out / "model"
    if config.export and checkpoint is not None and rank0:
        from megatron_m2d.distillation.megatron.export import export_after_training

        export_after_training(checkpoint, model)
    if dist.is_initialized():
        dist.barrier()
    return {"steps": state.step, "tokens": state.tokens, "checkpoint": str(checkpoint) if checkpoint else None,
            "model": str(model) if config.export and checkpoint else None, "train": state.train, "valid": state.valid}


def megatron_core_runs_here() -> bool:
    """megatron-core allocates on torch.cuda.current_device() in many places: a GPU, or a process that made that
    call answer otherwise (the test suite's CPU patches, tests/megatron_cpu.py)."""
    if torch.cuda.is_available():
        return True
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):  # "Torch not compiled with CUDA enabled" / no device
        return False
    return True
