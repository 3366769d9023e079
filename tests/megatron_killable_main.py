"""`[torchrun] python -m tests.megatron_killable_main --config run.json`: the engine's command line
(`python -m megatron_m2d.distillation.megatron`) under the test suite's CPU patches, with one fault injected where
the environment says (M2D_TEST_FAULT, on global rank M2D_TEST_FAULT_RANK, default 0):

    after_log:N   SIGKILL once step N's metrics are logged (its checkpoint, if any, not yet written)
    in_save:N     SIGKILL inside step N's checkpoint save, with every shard written and DCP's metadata not
    nan:N         step N's KD loss comes back NaN (what a diverging run reports)

Only the tests run it (tests/test_megatron_resume.py)."""

import os
import signal
import sys

import torch

from tests.megatron_cpu import apply_cpu_patches


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: str) -> None:
    """Wrap the engine's entry points (a process of our own: nothing to restore)."""
    from megatron_m2d.distillation.megatron import checkpointing, loop, metrics

    kind, step = fault.split(":")
    step = int(step)
    if kind == "after_log":
        log_train = metrics.MetricsLogger.log_train

        def logged(self, at, values):
            log_train(self, at, values)
            if at == step:
                _kill()

        metrics.MetricsLogger.log_train = logged
    elif kind == "in_save":
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        save, finish = checkpointing.save_checkpoint, FileSystemWriterAsync.finish

        def saving(root, at, *args, **kwargs):
            if at == step:
                FileSystemWriterAsync.finish = lambda self, metadata, results: _kill()
            try:
                return save(root, at, *args, **kwargs)
            finally:
                FileSystemWriterAsync.finish = finish

        checkpointing.save_checkpoint = saving
    elif kind == "nan":
        train_step = loop.train_step

        def diverged(engine, batches):
            values = train_step(engine, batches)
            return {**values, "kd_loss": float("nan")} if engine.scheduler.num_steps == step else values

        loop.train_step = diverged
    else:
        raise ValueError(f"unknown fault {fault!r}")


if __name__ == "__main__":
    apply_cpu_patches()
    torch._dynamo.config.disable = True  # a process of our own: nothing to restore
    if os.environ.get("M2D_TEST_FAULT") and os.environ.get("RANK", "0") == os.environ.get("M2D_TEST_FAULT_RANK", "0"):
        inject(os.environ["M2D_TEST_FAULT"])
    from megatron_m2d.distillation.megatron.__main__ import main

    sys.exit(main())
