"""`python -m megatron_m2d.distillation.megatron` (the engine's command line, under the CPU patches) killed and
started again, end to end: each test compares with one uninterrupted run of the same config (same layout, same
seed: fp32 on CPU is deterministic, so bitwise), step by step in metrics.jsonl and TensorBoard, and the final
student weight by weight.

- SIGKILL after step 5 was logged, its checkpoint not written: the restart redoes step 5 from step 4's checkpoint;
  every step appears once in metrics.jsonl and in TensorBoard, with the uninterrupted run's values.
- SIGKILL inside step 4's save: step 2's checkpoint loads, and the run ends where the uninterrupted one did.
- The finished run started again with its newest checkpoint corrupted: one warning line, the one before resumed,
  the same end (slow).
- A NaN KD loss at step 5 stops the run in one line; the checkpoints saved before it are kept.
- Two data-parallel ranks under torchrun, killed after step 3 and restarted (slow).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from tests.megatron_engine import make_pair, preprocessed_plays

pytest.importorskip("megatron.core")
pytest.importorskip("modelopt")

REPO = Path(__file__).resolve().parent.parent
STEPS = 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny teacher/student pair (converted) and ~150k tokens of the fixture's plays, preprocessed."""
    root = tmp_path_factory.mktemp("inputs")
    pair = make_pair(root)
    return {**pair, "data": preprocessed_plays(pair, root)}


def write_config(inputs, out: Path, **overrides) -> Path:
    settings = dict(teacher=str(inputs["teacher"]), student=str(inputs["student"]), data=[str(inputs["data"])],
                    out=str(out), precision="fp32", seq_len=32, micro_batch=2, global_batch=4, steps=STEPS,
                    warmup=1, lr=1e-3, save_every=2, keep_checkpoints=3, eval_every=3, eval_iters=1, log_every=1,
                    check_teacher=False, export=False, tensorboard=True)
    settings.update(overrides)
    path = out.with_name(out.name + ".json")
    path.write_text(json.dumps(settings))
    return path


def _started_by(marker: str) -> list[int]:
    """Processes whose environment carries `marker` (what one launch started, at any depth)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def launch(config: Path, fault: str | None = None, ranks: int = 1, timeout: int = 600) -> tuple[int, str]:
    """The engine's command line (torchrun for several ranks). Whatever it started is killed afterwards, found by
    a marker in its environment (torchrun puts each worker in a session of its own, and megatron-core's checkpoint
    writer keeps a Manager process that a SIGKILL of its parent leaves running). Returns (exit status, output)."""
    entry = ["-m", "tests.megatron_killable_main", "--config", str(config)]
    command = [sys.executable, *entry] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
        str(ranks), *entry]
    marker = f"M2D_TEST_LAUNCH={uuid.uuid4().hex}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "M2D_TEST_FAULT": fault or "",
           marker.split("=")[0]: marker.split("=")[1]}
    log = config.with_suffix(".log")
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            status = process.wait(timeout=timeout)
        finally:
            for pid in _started_by(marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return status, log.read_text()


def rows(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


LOGGED = {"train": ("loss", "kd_loss", "lm_loss", "grad_norm", "lr"), "valid": ("loss", "kd_loss", "lm_loss")}


def assert_same_run(ours: Path, whole: Path) -> None:
    """Every step once, each logged value and the final student bitwise equal to the uninterrupted run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_m2d.convert.dcp_read import ChunkReader
    from megatron_m2d.distillation.megatron.checkpoint_files import complete_checkpoints

    for split, keys in LOGGED.items():
        a, b = rows(ours, split), rows(whole, split)
        assert [r["step"] for r in a] == [r["step"] for r in b], split
        for x, y in zip(a, b):
            assert {k: x[k] for k in keys} == {k: y[k] for k in keys}, (split, x["step"])
    events = EventAccumulator(str(ours / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    assert [e.step for e in events.Scalars("train/kd_loss")] == list(range(1, STEPS + 1))
    last, reference = complete_checkpoints(ours / "checkpoints")[-1], complete_checkpoints(whole / "checkpoints")[-1]
    assert last.name == reference.name == f"step_{STEPS:07d}"
    a, b = ChunkReader(last), ChunkReader(reference)
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        shape = a.global_shape(key)
        if shape is None or key.startswith("optimizer."):
            continue
        chunk = type("Whole", (), dict(key=key, offsets=(0,) * len(shape), sizes=shape, dtype=torch.float32))
        assert torch.equal(*(r.read([chunk])[(key, chunk.offsets)] for r in (a, b))), key


@pytest.fixture(scope="module")
def whole(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    status, log = launch(write_config(inputs, out))
    assert status == 0, log[-3000:]
    return out


def test_kill_after_a_logged_step_then_restart_logs_each_step_once(inputs, whole, tmp_path):
    out = tmp_path / "run"
    config = write_config(inputs, out)
    status, log = launch(config, "after_log:5")
    assert status == -signal.SIGKILL, log[-3000:]
    assert [r["step"] for r in rows(out, "train")] == [1, 2, 3, 4, 5]  # step 5 logged, its checkpoint not written
    status, log = launch(config)
    assert status == 0, log[-3000:]
    assert_same_run(out, whole)


def test_kill_during_a_save_resumes_from_the_checkpoint_before(inputs, whole, tmp_path):
    out = tmp_path / "run"
    config = write_config(inputs, out)
    status, log = launch(config, "in_save:4")
    assert status == -signal.SIGKILL, log[-3000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / ".step_0000004.tmp").is_dir() and not (checkpoints / "step_0000004").exists()
    assert [r["step"] for r in rows(out, "train")] == [1, 2, 3, 4]
    status, log = launch(config)  # resumes from step 2
    assert status == 0, log[-3000:]
    assert not (checkpoints / ".step_0000004.tmp").exists()
    assert_same_run(out, whole)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_one_before_resumed(inputs, whole, tmp_path):
    """The finished run started again with its newest checkpoint truncated: one warning line, steps 5-6 redone
    from step 4's checkpoint, the same end."""
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    newest = out / "checkpoints" / f"step_{STEPS:07d}"
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:64])
    status, log = launch(write_config(inputs, out))
    assert status == 0, log[-3000:]
    warnings = [line for line in log.splitlines() if line.startswith("m2d: warning:")]
    assert len(warnings) == 1 and f"step_{STEPS:07d} is unreadable" in warnings[0] and "step_0000004" in warnings[0]
    assert (out / "checkpoints" / f".step_{STEPS:07d}.unreadable").is_dir()
    assert_same_run(out, whole)


def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoints_before_it(inputs, tmp_path):
    out = tmp_path / "run"
    status, log = launch(write_config(inputs, out), "nan:5")
    errors = [line for line in log.splitlines() if line.startswith("m2d: error:")]
    assert status == 2 and len(errors) == 1 and "non-finite kd_loss = nan at step 5" in errors[0], log[-3000:]
    assert "Traceback" not in log
    from megatron_m2d.distillation.megatron.checkpoint_files import complete_checkpoints

    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_0000002", "step_0000004"]
    assert [r["step"] for r in rows(out, "train")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_data_parallel_ranks_killed_and_restarted_follow_the_same_curve(inputs, tmp_path):
    """torchrun, 2 gloo ranks (DP2): killed after step 3 (checkpoint at 2), restarted: bitwise the uninterrupted
    DP2 run (each rank's RNG stream and data shard continue); the restarted run ends with its export (rank 0 runs
    it in a fresh process, which must not join torchrun's rendezvous)."""
    whole_out, out = tmp_path / "whole", tmp_path / "run"
    status, log = launch(write_config(inputs, whole_out), ranks=2)
    assert status == 0, log[-3000:]
    config = write_config(inputs, out)
    status, log = launch(config, "after_log:3", ranks=2)
    assert status != 0 and [r["step"] for r in rows(out, "train")] == [1, 2, 3], log[-3000:]
    write_config(inputs, out, export=True)
    status, log = launch(config, ranks=2)
    assert status == 0, log[-3000:]
    assert_same_run(out, whole_out)
    assert (out / "model" / "config.json").is_file()
