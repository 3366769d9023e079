"""A tiny Megatron training setup for the checkpointing tests: a converted 2-layer dense student, megatron-core's
DDP, optimizer and OptimizerParamScheduler, and a step whose batch comes from torch's global generator (so a
resumed run repeats the uninterrupted one only if the RNG streams were restored too)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tests.megatron_cpu import causal_mask

SEQ, BATCH, VOCAB = 16, 4, 259


@dataclass
class RunSettings:
    """The fields of the run config checkpointing reads (RunConfig's names)."""
    keep_checkpoints: int = 3
    seed: int = 0
    lr: float = 1e-3

    def to_dict(self) -> dict:
        return asdict(self)


def build_student(tmp_path: Path) -> Path:
    """The tiny dense student (fp32), converted as `m2d convert hf-to-megatron` does."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from tests.convert_models import tiny_dense

    out = tmp_path / "student"
    if not out.exists():
        hf_to_megatron_checkpoint(tiny_dense(tmp_path / "hf-student", "qwen3"), out, progress=False)
    return out


def params_of(model) -> list[tuple[str, torch.Tensor]]:
    from megatron.core.utils import unwrap_model

    return [(n, p.detach().clone()) for n, p in unwrap_model(model).named_parameters()]


class TinyTraining:
    """Student + DDP + Adam (megatron-core's optimizer) + cosine OptimizerParamScheduler. `seed` sets the
    initial weights' noise, so two instances differ until one loads the other's checkpoint."""

    def __init__(self, student: Path, seed: int, use_distributed_optimizer: bool = False):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_m2d.convert.provider import load_checkpoint, model_provider

        self.model = model_provider(student, params_dtype=torch.float32, use_te=False)()
        load_checkpoint(self.model, student)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for p in self.model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
        self.ddp = DistributedDataParallel(self.model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=use_distributed_optimizer), self.model)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.01, clip_grad=1.0, bf16=False,
            use_distributed_optimizer=use_distributed_optimizer), [self.ddp])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=20,
            lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=20, wd_incr_style="constant")

    def step(self, ids: torch.Tensor | None = None) -> float:
        from megatron.core.distributed import finalize_model_grads

        if ids is None:
            ids = torch.randint(0, VOCAB, (BATCH, SEQ))  # the global generator: restored RNG matters
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        positions = torch.arange(SEQ).unsqueeze(0).expand_as(ids)
        loss = self.ddp(ids, positions, attention_mask=causal_mask(SEQ), labels=ids).mean()
        loss.backward()
        finalize_model_grads([self.ddp])  # DP gradient reduction, and q/k-norm gradients summed over TP
        ok, _, _ = self.optimizer.step()
        assert ok
        self.scheduler.step(increment=1)
        return loss.item()


def kill_during_second_save(student: str, root: str) -> None:
    """In a process of its own: save step 1, train a step, then SIGKILL itself while step 2's shards are written."""
    import os
    import signal

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from megatron_m2d.distillation.megatron import checkpointing
    from tests.megatron_cpu import apply_cpu_patches, free_port

    apply_cpu_patches()
    torch._dynamo.config.disable = True
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    run = TinyTraining(Path(student), seed=0)
    run.step()
    checkpointing.save_checkpoint(root, 1, [run.ddp], run.optimizer, run.scheduler,
                                  checkpointing.TrainState(step=1), RunSettings(), student)
    run.step()

    def killed(self, metadata, results):  # every shard is on disk, the DCP metadata not yet
        os.kill(os.getpid(), signal.SIGKILL)

    FileSystemWriterAsync.finish = killed  # a process of our own, killed: nothing to restore
    checkpointing.save_checkpoint(root, 2, [run.ddp], run.optimizer, run.scheduler,
                                  checkpointing.TrainState(step=2), RunSettings(), student)


def fixed_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _record(path: str, run: TinyTraining, loss: float) -> None:
    torch.save({"loss": loss, "params": dict(params_of(run.model))}, path)


def save_then_continue(rank: int, world: int, student: str, root: str, tp: int, record: str) -> None:
    """Train 2 steps at TP `tp` (DP the rest), save, then take the uninterrupted run's next step: its loss and
    parameters go to `record`.{rank}. Each rank draws its batches from its own seed (per-rank RNG streams)."""
    from megatron.core import parallel_state

    from megatron_m2d.distillation.megatron import checkpointing

    parallel_state.initialize_model_parallel(tp, 1)
    torch.manual_seed(100 + rank // tp)  # TP ranks of a group see the same batch
    run = TinyTraining(Path(student), seed=0)
    run.step(), run.step()
    checkpointing.save_checkpoint(root, 2, [run.ddp], run.optimizer, run.scheduler,
                                  checkpointing.TrainState(step=2), RunSettings(), student)
    _record(f"{record}.{rank}", run, run.step(None if tp == 1 else fixed_batch()))


def resume_then_step(rank: int, world: int, student: str, root: str, tp: int, record: str) -> None:
    """A fresh process: other seeds, load the newest checkpoint, take one step; loss and parameters to `record`."""
    from megatron.core import parallel_state

    from megatron_m2d.distillation.megatron import checkpointing

    if not parallel_state.model_parallel_is_initialized():  # (the megatron_cpu fixture's TP1 one may be)
        parallel_state.initialize_model_parallel(tp, 1)
    torch.manual_seed(999)
    run = TinyTraining(Path(student), seed=1)
    assert checkpointing.load_latest_checkpoint(root, [run.ddp], run.optimizer, run.scheduler).step == 2
    _record(f"{record}.{rank}", run, run.step(None if world == 2 and tp == 1 else fixed_batch()))
