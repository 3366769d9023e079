"""Distillation: the loss falls, a resumed run continues the same loss curve, schedules and options behave."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_m2d.baselines.random_ffn import random_ffn
from megatron_m2d.distillation import hf as hf_module
from megatron_m2d.distillation.hf import DistillConfig, distill, kd_loss
from megatron_m2d.distillation.state import learning_rate
from megatron_m2d.errors import M2DError


def sharp_teacher(model):
    """A random model predicts nearly uniformly; scaled output weights give a teacher worth imitating."""
    model.lm_head.weight.mul_(40.0)


@pytest.fixture
def pair(tiny, tmp_path):
    teacher = tiny("qwen3_moe", edit=sharp_teacher)
    student = random_ffn(teacher, tmp_path / "student", progress=False)
    return teacher, student


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


CONFIG = dict(steps=10, seq_len=32, micro_batch=4, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup=2,
              train_tokens=4096, save_every=5, log_every=1)


def test_loss_decreases_and_resume_continues_the_same_curve(pair, text_dir, tmp_path, monkeypatch):
    teacher, student = pair
    whole = tmp_path / "whole"
    distill(teacher, student, str(text_dir), whole, DistillConfig(**CONFIG), device="cpu", progress=False)
    curve = losses(whole)
    assert len(curve) == 10
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3  # it learns

    original = hf_module.save_training_state

    def killed_after_first_save(directory, *args, **kwargs):
        original(directory, *args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(hf_module, "save_training_state", killed_after_first_save)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student, str(text_dir), interrupted, DistillConfig(**CONFIG), device="cpu", progress=False)
    assert len(losses(interrupted)) == 5
    monkeypatch.setattr(hf_module, "save_training_state", original)
    distill(teacher, student, str(text_dir), interrupted, DistillConfig(**CONFIG), device="cpu", progress=False)
    resumed = losses(interrupted)
    assert len(resumed) == 10
    # same seed, same batches, restored weights and AdamW moments: the same curve (fp32 CPU is deterministic)
    assert resumed == pytest.approx(curve, rel=1e-5, abs=1e-7)
    final = tmp_path / "interrupted" / "model"
    assert (final / "model-00001-of-00001.safetensors").exists() or (final / "model.safetensors").exists()
    assert "Distillation" in (final / "README.md").read_text()


def test_kd_loss_is_forward_kl_with_temperature():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    temperature = 2.0
    p = torch.softmax(t / temperature, -1)
    expected = (p * (p.log() - torch.log_softmax(s / temperature, -1))).sum(-1) * temperature**2
    assert torch.allclose(kd_loss(s, t, temperature), expected, atol=1e-6)
    assert float(kd_loss(t, t, 1.0).abs().max()) < 1e-6


def test_schedules():
    wsd = [learning_rate(s, 100, 1.0, 0.1, "wsd", 10, 20) for s in range(100)]
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in wsd[10:80]) and wsd[-1] == pytest.approx(0.1)
    cosine = [learning_rate(s, 100, 1.0, 0.1, "cosine", 10, 0) for s in range(100)]
    assert cosine[10] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))


def test_teacher_top_k_expansion_and_lm_mix(pair, text_dir, tmp_path):
    teacher, student = pair
    config = DistillConfig(**{**CONFIG, "steps": 2, "teacher_top_k": 4, "kd_weight": 0.5})
    distill(teacher, student, str(text_dir), tmp_path / "x", config, device="cpu", progress=False)
    record = json.loads((tmp_path / "x" / "log.jsonl").read_text().splitlines()[-1])
    assert record["loss"] == pytest.approx(0.5 * record["kd"] + 0.5 * record["lm"], rel=1e-5)
    with pytest.raises(M2DError, match="exceeds"):
        distill(teacher, student, str(text_dir), tmp_path / "y", DistillConfig(**{**CONFIG, "teacher_top_k": 99}),
                device="cpu", progress=False)


def test_torchrun_ddp_matches_single_process(pair, text_dir, tmp_path):
    """2 gloo processes, each half of every global batch: the same loss curve as one process taking all of it
    (gradients are averaged over ranks exactly as over a single process's micro-batches)."""
    import os
    import subprocess
    import sys

    teacher, student = pair
    args = ["--teacher", teacher, "--student", student, "--data", text_dir, "--steps", "3", "--seq-len", "32",
            "--train-tokens", "4096", "--lr", "1e-3", "--warmup", "1", "--device", "cpu"]
    single = tmp_path / "single"
    main_args = [str(a) for a in ["distill", *args, "--micro-batch", "4", "--grad-accum", "2", "--out", single]]
    from megatron_m2d.cli import main

    assert main(main_args) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "megatron_m2d.cli", "distill", *map(str, args), "--micro-batch", "4",
                             "--out", str(ddp)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((ddp / "distill_config.json").read_text())["world"] == 2
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4)
