"""Training metrics: one rank reports, a resumed run never duplicates rows (metrics.jsonl, TensorBoard), a
non-finite loss stops the run, throughput and MFU follow from the stated FLOPs and peak."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import pytest

from megatron_m2d.distillation.megatron import metrics
from megatron_m2d.distillation.megatron.metrics import MetricsLogger
from megatron_m2d.errors import M2DError


@dataclass
class Settings:
    steps: int = 10
    global_batch: int = 4
    seq_len: int = 16
    tensorboard: bool = True
    wandb_project: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def values(step: int) -> dict:
    return {"loss": 1.0 / step, "kd_loss": 2.0 / step, "lm_loss": 3.0 / step, "lr": 1e-4, "grad_norm": 0.5}


def scalars(directory, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), purge_orphaned_data=True)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_resumed_run_never_duplicates_rows(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, Settings(), rank0=True)
    for step in range(1, 7):  # killed after logging step 6; its last checkpoint was step 4
        logger.log_train(step, values(step))
    logger.log_valid(4, {"loss": 9.0, "kd_loss": 8.0, "lm_loss": 7.0})
    logger.rows.write('{"split": "train", "st')  # the kill cut the last row in half
    logger.rows.flush()
    resumed = MetricsLogger(tmp_path, Settings(), rank0=True, start_step=4)
    for step in range(5, 11):
        resumed.log_train(step, values(step))
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 11))
    assert [r["step"] for r in rows if r["split"] == "valid"] == [4]
    assert all(r["kd_loss"] == 2.0 / r["step"] for r in rows if r["split"] == "train")
    got = scalars(tmp_path / "tensorboard", "train/kd_loss")
    assert [s for s, _ in got] == list(range(1, 11))
    assert all(math.isclose(v, 2.0 / s, rel_tol=1e-6) for s, v in got)
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() + out.err.splitlines() if line.startswith("step ")]
    assert sum("step  7/10" in line for line in lines) == 1 and "kd 0.2857" in next(
        line for line in lines if "step  7/10" in line)


def test_only_rank0_writes_or_prints(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "run", Settings(), rank0=False)
    logger.log_train(1, values(1))
    logger.log_valid(1, values(1))
    logger.close()
    assert not (tmp_path / "run").exists()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


@pytest.mark.parametrize("bad", ["kd_loss", "grad_norm"])
def test_a_non_finite_value_stops_the_run(tmp_path, bad):
    logger = MetricsLogger(tmp_path, Settings(tensorboard=False), rank0=True)
    with pytest.raises(M2DError, match=f"non-finite {bad} = nan at step 3"):
        logger.log_train(3, {**values(3), bad: float("nan")})
    with pytest.raises(M2DError, match="inf"):
        metrics.check_finite(3, {"loss": float("inf")})
    metrics.check_finite(3, values(3))


def test_throughput_and_mfu_follow_the_stated_numbers(tmp_path, monkeypatch):
    clock = iter([100.0, 102.0])  # construction, then the log call: 2 s for 4 steps
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    logger = MetricsLogger(tmp_path, Settings(tensorboard=False), rank0=True, flops_per_token=1e9, world_size=2,
                           peak=(10.0, "given"))
    logger.log_train(4, values(4))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["tokens_per_s"] == 4 * 4 * 16 / 2.0
    assert math.isclose(row["tflops_per_device"], 128 * 1e9 / 1e12 / 2)
    assert math.isclose(row["mfu"], row["tflops_per_device"] / 10.0)


def test_peak_is_given_or_measured():
    assert metrics.peak_tflops(given=123.0) == (123.0, "given")
    measured, source = metrics.peak_tflops()
    assert measured > 0 and "measured" in source


def test_wandb_asked_for_but_missing_is_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(M2DError, match="wandb is not installed"):
        MetricsLogger(tmp_path, Settings(tensorboard=False, wandb_project="p"), rank0=True)


def test_flops_per_token_is_the_planners(tmp_path):
    """Student training 3 x forward + the teacher's forward at its (expanded) top-k: planning.flops' numbers."""
    from megatron_m2d.planning.flops import forward_flops
    from megatron_m2d.planning.shapes import ModelShape
    from megatron_m2d.testing.tiny import build_tiny_moe
    from tests.convert_models import tiny_dense

    student, teacher = tiny_dense(tmp_path / "student", "qwen3"), build_tiny_moe(tmp_path / "teacher")
    got = metrics.flops_per_token(student, teacher, 64, teacher_top_k=4)
    s, t = ModelShape.from_dir(student), ModelShape.from_dir(teacher)
    assert got == 3 * forward_flops(s, 64).total + forward_flops(t, 64, 4).total
    assert got > metrics.flops_per_token(student, teacher, 64)  # 4 experts per token cost more than 2
