"""Training checkpoints of the Megatron engine: a save/load round trip restores model, optimizer, scheduler, RNG
and train state bit for bit (and the next step is bitwise the uninterrupted one); a kill during a save, a corrupt
newest checkpoint and a crafted pickle each leave the run resumable from the checkpoint before; the model keys
are the converter's, so `m2d convert megatron-to-hf` reads a training checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from megatron_m2d.distillation.megatron import checkpointing, rng
from megatron_m2d.distillation.megatron.checkpointing import TrainState
from megatron_m2d.errors import M2DError
from tests.megatron_cpu import megatron_cpu, run_gloo  # noqa: F401  (fixture)
from tests.megatron_training import (RunSettings, TinyTraining, build_student, params_of, resume_then_step,
                                    save_then_continue)


def assert_same_training(a: TinyTraining, b: TinyTraining) -> None:
    """Parameters, optimizer moments and steps, scheduler state: bitwise."""
    for (name, x), (_, y) in zip(params_of(a.model), params_of(b.model), strict=True):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    flat_a, flat_b = [], []
    for state, out in ((sa, flat_a), (sb, flat_b)):
        for opt in state if isinstance(state, list) else [state]:
            for index, values in sorted(opt["state"].items(), key=lambda kv: str(kv[0])):
                out += [(str(index), k, v) for k, v in sorted(values.items())]
    assert len(flat_a) == len(flat_b) > 0
    for (ia, ka, va), (ib, kb, vb) in zip(flat_a, flat_b):
        assert (ia, ka) == (ib, kb)
        assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), (ia, ka)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()


def test_rng_capture_restore_is_exact():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(rng.capture()))  # through JSON, as on disk
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng.restore(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_round_trip_is_bitwise_and_the_next_step_too(megatron_cpu, tmp_path):  # noqa: F811
    student = build_student(tmp_path)
    run = TinyTraining(student, seed=0)
    for _ in range(2):
        run.step()
    state = TrainState(step=2, consumed_train_samples=8, tokens=8 * 16, train={"kd_loss": 1.5})
    path = checkpointing.save_checkpoint(tmp_path / "ckpt", 2, [run.ddp], run.optimizer, run.scheduler, state,
                                         RunSettings(), student)
    assert path.name == "step_0000002" and (path / "COMPLETE").is_file()
    torch.manual_seed(1234)  # the resumed process draws other random numbers before it loads
    resumed = TinyTraining(student, seed=1)
    got = checkpointing.load_latest_checkpoint(tmp_path / "ckpt", [resumed.ddp], resumed.optimizer,
                                               resumed.scheduler)
    assert got == state
    assert_same_training(run, resumed)
    restored = torch.get_rng_state()
    assert torch.equal(restored, _rng_after_save(path))
    loss_a = run.step()  # both draw their batch from the one global generator: rewind it in between
    torch.set_rng_state(restored)
    loss_b = resumed.step()
    assert loss_a == loss_b
    assert_same_training(run, resumed)


def _rng_after_save(path):
    return rng._tensor(json.loads((path / "rng" / "rank_00000.json").read_text())["torch"])


def test_keys_are_the_converters_and_megatron_to_hf_reads_it(megatron_cpu, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from megatron_m2d.convert.checkpoint import megatron_to_hf_checkpoint
    from megatron_m2d.convert.dcp_read import ChunkReader

    student = build_student(tmp_path)
    run = TinyTraining(student, seed=0)
    run.step()
    path = checkpointing.save_checkpoint(tmp_path / "ckpt", 1, [run.ddp], run.optimizer, run.scheduler,
                                         TrainState(step=1), RunSettings(), student)
    model_keys = {k for k in ChunkReader(path).keys() if not k.startswith("optimizer.")}
    assert model_keys == set(ChunkReader(student).keys())
    assert any(k.startswith("optimizer.") for k in ChunkReader(path).keys())
    hf = megatron_to_hf_checkpoint(path, tmp_path / "hf", progress=False)
    weights = {}
    for shard in hf.glob("*.safetensors"):
        weights.update(load_file(shard))
    trained = dict(params_of(run.model))
    assert torch.equal(weights["model.norm.weight"], trained["decoder.final_layernorm.weight"])
    assert not torch.equal(weights["model.norm.weight"], load_file(tmp_path / "hf-student" / "model.safetensors")[
        "model.norm.weight"])  # trained, not the student it started from


def test_keeps_the_newest_and_replaces_a_stale_step(megatron_cpu, tmp_path):  # noqa: F811
    student = build_student(tmp_path)
    run = TinyTraining(student, seed=0)
    root = tmp_path / "ckpt"
    for step in (1, 2, 3, 4):
        run.step()
        checkpointing.save_checkpoint(root, step, [run.ddp], run.optimizer, run.scheduler, TrainState(step=step),
                                      RunSettings(keep_checkpoints=2), student)
    assert [p.name for p in checkpointing.complete_checkpoints(root)] == ["step_0000003", "step_0000004"]
    checkpointing.save_checkpoint(root, 4, [run.ddp], run.optimizer, run.scheduler, TrainState(step=4, tokens=7),
                                  RunSettings(keep_checkpoints=2), student)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000004"]
    resumed = TinyTraining(student, seed=1)
    assert checkpointing.load_latest_checkpoint(root, [resumed.ddp], resumed.optimizer, resumed.scheduler).tokens == 7


def _corrupt_distcp(path):
    shard = sorted(path.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])


def _corrupt_metadata(path):
    (path / ".metadata").write_bytes(b"\x80\x04not a pickle")


def _corrupt_state(path):
    (path / "train_state.json").write_text("{")


def _evil_common(path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'pwned'}",))

    torch.save({"x": Evil()}, path / "common.pt")


@pytest.mark.parametrize("corrupt", [_corrupt_distcp, _corrupt_metadata, _corrupt_state, _evil_common])
def test_unreadable_newest_falls_back_with_one_line(megatron_cpu, corrupt, tmp_path, capfd):  # noqa: F811
    student = build_student(tmp_path)
    run = TinyTraining(student, seed=0)
    root = tmp_path / "ckpt"
    run.step()
    checkpointing.save_checkpoint(root, 1, [run.ddp], run.optimizer, run.scheduler, TrainState(step=1),
                                  RunSettings(), student)
    run.step()
    newest = checkpointing.save_checkpoint(root, 2, [run.ddp], run.optimizer, run.scheduler, TrainState(step=2),
                                           RunSettings(), student)
    corrupt(newest)
    capfd.readouterr()
    resumed = TinyTraining(student, seed=1)
    state = checkpointing.load_latest_checkpoint(root, [resumed.ddp], resumed.optimizer, resumed.scheduler)
    assert state.step == 1
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("m2d: warning:")]
    assert len(warnings) == 1 and "step_0000002 is unreadable" in warnings[0] and "step_0000001" in warnings[0]
    assert not (root / "pwned").exists() and not (tmp_path / "pwned").exists()
    assert (root / ".step_0000002.unreadable").is_dir() and not newest.exists()


def test_no_readable_checkpoint_is_an_error(megatron_cpu, tmp_path):  # noqa: F811
    student = build_student(tmp_path)
    run = TinyTraining(student, seed=0)
    root = tmp_path / "ckpt"
    run.step()
    path = checkpointing.save_checkpoint(root, 1, [run.ddp], run.optimizer, run.scheduler, TrainState(step=1),
                                         RunSettings(), student)
    _corrupt_metadata(path)
    with pytest.raises(M2DError, match="no readable checkpoint"):
        checkpointing.load_latest_checkpoint(root, [run.ddp], run.optimizer, run.scheduler)
    assert checkpointing.load_latest_checkpoint(tmp_path / "none", [run.ddp], run.optimizer, run.scheduler) is None


def test_kill_during_a_save_leaves_the_previous_checkpoint(megatron_cpu, tmp_path):  # noqa: F811
    """A process saves step 1, then is killed (SIGKILL) while DCP writes step 2's files."""
    student = build_student(tmp_path)
    root = tmp_path / "ckpt"
    script = f"""
import os, signal, sys
sys.path.insert(0, {os.getcwd()!r})
from tests.megatron_training import kill_during_second_save
kill_during_second_save({str(student)!r}, {str(root)!r})
"""
    log = tmp_path / "killed.log"
    with open(log, "w") as out:  # its own session: megatron-core's writer helpers die with it (killpg below)
        process = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        try:
            returncode = process.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert (root / ".step_0000002.tmp").is_dir() and not (root / "step_0000002").exists()
    run = TinyTraining(student, seed=1)
    assert checkpointing.load_latest_checkpoint(root, [run.ddp], run.optimizer, run.scheduler).step == 1
    assert not (root / ".step_0000002.tmp").exists()  # the interrupted save is cleaned up on start


def test_data_parallel_checkpoint_resumes_bitwise_on_two_ranks(megatron_cpu, tmp_path):  # noqa: F811
    """DP2 on 2 gloo processes (megatron-core's fully parallel save shares the writing): a fresh pair of
    processes resumes with each rank's own RNG stream, and the next step is bitwise the uninterrupted one."""
    student, root = build_student(tmp_path), tmp_path / "ckpt"
    run_gloo(2, save_then_continue, str(student), str(root), 1, str(tmp_path / "before"))
    run_gloo(2, resume_then_step, str(student), str(root), 1, str(tmp_path / "after"))
    for rank in (0, 1):
        before, after = (torch.load(tmp_path / f"{name}.{rank}", weights_only=True) for name in ("before", "after"))
        assert before["loss"] == after["loss"]
        assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])
    assert len(list((checkpointing.complete_checkpoints(root)[0] / "rng").iterdir())) == 2


def test_tensor_parallel_checkpoint_resumes_at_tp1(megatron_cpu, tmp_path, capfd):  # noqa: F811
    """Written at TP2 (2 processes), resumed at TP1 in this one: model and optimizer state reshard, so the next
    step on the same batch matches the uninterrupted TP2 run up to fp32 reduction order: the loss (from the loaded
    weights) to 1e-5 relative (measured 1.2e-6: TP splits the row-parallel matmuls' and the vocabulary's sums),
    the updated weights to 1e-4 (Adam's normalisation lifts the noise of a near-zero gradient towards lr: seen
    1.8e-5 on one embedding entry, 1e-8 elsewhere; wrong moments would move many entries by ~lr = 1e-3)."""
    student, root = build_student(tmp_path), tmp_path / "ckpt"
    run_gloo(2, save_then_continue, str(student), str(root), 2, str(tmp_path / "before"))
    capfd.readouterr()
    resume_then_step(0, 1, str(student), str(root), 1, str(tmp_path / "after"))
    assert "written by 2 ranks, this run has 1" in capfd.readouterr().err
    before, after = (torch.load(tmp_path / f"{name}.0", weights_only=True) for name in ("before", "after"))
    assert math.isclose(before["loss"], after["loss"], rel_tol=1e-5)
    for name, value in after["params"].items():  # rank 0 of TP2 holds the first half of each split tensor
        shard = before["params"][name]
        if name.endswith("linear_fc1.weight"):  # [gate; up], each split in two: rank 0 has both first halves
            half = value.shape[0] // 2
            value = torch.cat([value[:half // 2], value[half:half + half // 2]])
        piece = value[tuple(slice(0, n) for n in shard.shape)]
        assert torch.allclose(piece, shard, atol=1e-4, rtol=0), name


def test_train_state_keeps_a_window_of_recent_losses():
    state = TrainState()
    for step in range(1, 151):
        state.record_train({"kd_loss": float(step), "lm_loss": 1.0, "grad_norm": 0.1})
    assert state.train["kd_loss"] == 150.0 and len(state.recent["kd_loss"]) == checkpointing.RECENT_STEPS
    assert state.recent_mean("kd_loss") == sum(range(51, 151)) / 100 and state.recent_mean("loss") is None
    assert TrainState.from_json(json.loads(json.dumps(asdict(state)))) == state


def test_resuming_with_changed_settings_says_which_in_one_line(megatron_cpu, tmp_path, capfd):  # noqa: F811
    student = build_student(tmp_path)
    run = TinyTraining(student, seed=0)
    run.step()
    checkpointing.save_checkpoint(tmp_path / "ckpt", 1, [run.ddp], run.optimizer, run.scheduler, TrainState(step=1),
                                  RunSettings(), student)
    capfd.readouterr()
    changed = RunSettings(keep_checkpoints=5, seed=3)  # keep_checkpoints changes nothing computed, the seed does
    checkpointing.load_latest_checkpoint(tmp_path / "ckpt", [run.ddp], run.optimizer, run.scheduler, changed)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("m2d: warning:")]
    assert len(warnings) == 1 and "changed settings seed:" in warnings[0] and "keep_checkpoints" not in warnings[0]


def test_extra_states_that_transformer_engine_would_unpickle_are_not_loaded():
    """TE's set_extra_state runs pickle.loads on a byte tensor: such states are dropped before load_state_dict;
    the local spec's (None) and the weights pass."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    poisoned = torch.frombuffer(bytearray(pickle.dumps(Evil())), dtype=torch.uint8)
    state = {"decoder.layers.0.mlp.linear_fc1._extra_state": poisoned,
             "decoder.layers.0.mlp.linear_fc2._extra_state": None, "decoder.final_layernorm.weight": torch.ones(2)}
    kept, dropped = checkpointing.without_pickled_extra_state(state)
    assert dropped == 1 and set(kept) == {"decoder.layers.0.mlp.linear_fc2._extra_state",
                                          "decoder.final_layernorm.weight"}
