"""Helpers of the Megatron distillation engine's tests: a tiny teacher/student pair on disk (HF and converted),
the batches both backends see, and the HF backend's loss and gradients on them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from megatron_m2d.testing.tiny import VOCAB, build_tiny_moe

SEQ = 16


def sharp_teacher(model):
    """A random model predicts nearly uniformly; scaled output weights give a teacher worth imitating."""
    model.lm_head.weight.mul_(40.0)


def make_pair(root: Path) -> dict[str, Path]:
    """HF teacher (tiny Qwen3-MoE) and student (its random-FFN dense student), and both converted to Megatron.
    Runs megatron-core's conversion in this process and tears its process group down again."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_m2d.baselines.random_ffn import random_ffn
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint

    teacher = build_tiny_moe(root / "teacher", "qwen3_moe", edit=sharp_teacher)
    # the student of the same MoE before its output layer was sharpened: far from the teacher, so the loss falls
    # steadily over the first steps (near the optimum, Adam's first steps make the curve erratic)
    student = random_ffn(build_tiny_moe(root / "plain", "qwen3_moe"), root / "student", progress=False)
    try:
        paths = dict(teacher_hf=teacher, student_hf=student,
                     teacher=hf_to_megatron_checkpoint(teacher, root / "teacher-megatron", progress=False),
                     student=hf_to_megatron_checkpoint(student, root / "student-megatron", progress=False))
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    return paths


def token_ids(seed: int, rows: int, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def megatron_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The HF backend's view of a block as a Megatron batch: every position is a token, the last has no label."""
    from megatron_m2d.distillation.megatron.loss import IGNORE_INDEX

    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    return {"tokens": ids, "labels": labels, "loss_mask": torch.ones(ids.shape, dtype=torch.float32),
            "position_ids": torch.arange(ids.shape[1]).expand_as(ids).contiguous()}


def micro_batches(ids: torch.Tensor, micro: int):
    return iter([megatron_batch(m) for m in ids.split(micro)])


def hf_step(pair: dict, ids: torch.Tensor, micro: int, temperature: float, kd_weight: float):
    """The HF backend's loss (averaged over micro-batches, as its loop does) and the student's gradients."""
    from transformers import AutoModelForCausalLM

    from megatron_m2d.distillation.hf import micro_batch_loss

    teacher = AutoModelForCausalLM.from_pretrained(pair["teacher_hf"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(pair["student_hf"], dtype=torch.float32)
    parts = ids.split(micro)
    total = torch.zeros(3, dtype=torch.float64)
    for part in parts:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=part).logits
        loss, kd, lm = micro_batch_loss(student(input_ids=part).logits, teacher_logits, part, temperature, kd_weight)
        (loss / len(parts)).backward()
        total += torch.tensor([loss.item(), kd.item(), lm.item()], dtype=torch.float64) / len(parts)
    return dict(zip(("loss", "kd_loss", "lm_loss"), total.tolist())), \
        {name: p.grad for name, p in student.named_parameters()}


def megatron_grads(distillation) -> dict[str, torch.Tensor]:
    """The Megatron student's accumulated gradients by parameter name (at TP1/PP1 the conversion table's keys)."""
    return {name: p.main_grad.detach().clone() for name, p in distillation.named_parameters() if p.requires_grad}


def hf_grads_in_megatron_layout(hf_grads: dict, hf_config, vocab_rows: int, keys) -> dict[str, torch.Tensor]:
    from megatron_m2d.convert.mapping import split_source
    from megatron_m2d.convert.megatron_model import table_for

    table = table_for(hf_config, vocab_rows)

    def grad(source):
        key, row = split_source(source)
        return hf_grads[key] if row is None else hf_grads[key][row]

    return {k: table[k].to_megatron([grad(s) for s in table[k].sources()], hf_config) for k in keys}


def run_config(pair: dict, out: Path, **settings):
    """A run of the pair on hand-made batches: fp32 (CPU), no teacher check unless asked."""
    from megatron_m2d.distillation.megatron.config import RunConfig

    base = dict(teacher=str(pair["teacher"]), student=str(pair["student"]), data=["unused"], out=str(out),
                precision="fp32", seq_len=SEQ, micro_batch=2, global_batch=4, steps=10, warmup=0, lr=3e-3,
                min_lr=3e-4, schedule="constant", check_teacher=False)
    return RunConfig(**{**base, **settings})


def loss_curve(config, steps: int) -> list[dict]:
    """Train `steps` steps on the global batches token_ids(100 + step) (each data-parallel rank its share, in
    micro-batches) in the current process group; the per-step losses (the same on every rank)."""
    from megatron.core import parallel_state

    from megatron_m2d.distillation.megatron.loop import build_engine, train_step
    from megatron_m2d.distillation.megatron.parallel import initialize

    from megatron_m2d.distillation.megatron.teacher_check import check_teacher

    layout = initialize(config)
    engine = build_engine(config, layout, Path(config.student), Path(config.teacher), torch.device("cpu"))
    if config.check_teacher:  # the check's own pipeline/TP/EP path; its verdict raises on every rank
        check_teacher(engine.models.teacher, Path(config.teacher), engine.models.vocab_size, layout.tp,
                      config.teacher_top_k, torch.device("cpu"), engine.models.uses_te)
    share = layout.micro_batch * layout.num_micro_batches
    curve = []
    for step in range(steps):
        mine = token_ids(100 + step, layout.global_batch).split(share)[parallel_state.get_data_parallel_rank()]
        curve.append(train_step(engine, micro_batches(mine, layout.micro_batch)))
    return curve


def _curve_on_rank(rank: int, world: int, config: dict, steps: int, path: str) -> None:
    from megatron_m2d.distillation.megatron.config import RunConfig

    curve = loss_curve(RunConfig(**config), steps)
    if rank == 0:
        Path(path).write_text(json.dumps(curve))


def run_engine(world: int, config, steps: int, path: Path) -> list[dict]:
    """loss_curve on `world` gloo processes (tests/megatron_cpu.run_gloo)."""
    from tests.megatron_cpu import run_gloo

    run_gloo(world, _curve_on_rank, config.to_dict(), steps, str(path))
    return json.loads(path.read_text())


def preprocessed_plays(pair: dict, root: Path) -> Path:
    """~150k tokens of the fixture's plays, one document per paragraph, in the student's tokenizer: a prefix."""
    from megatron_m2d.distillation.megatron.preprocess import preprocess
    from megatron_m2d.testing.corpus import paragraph_jsonl

    preprocess([paragraph_jsonl(root / "plays.jsonl")], root / "plays", pair["student_hf"], progress=False)
    return root / "plays"


def train_rows(out: Path) -> list[dict]:
    """The train rows of a run's metrics.jsonl."""
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def run_killed_after(settings: dict, kill_after_step: int | None) -> None:
    """run() of RunConfig(**settings); with kill_after_step, SIGKILL right after that step's update (mid-run:
    nothing of the step logged or saved)."""
    from megatron_m2d.distillation.megatron import loop
    from megatron_m2d.distillation.megatron.config import RunConfig
    from megatron_m2d.distillation.megatron.run import run

    if kill_after_step is not None:
        train_step = loop.train_step

        def killed(engine, batches):
            values = train_step(engine, batches)
            if engine.scheduler.num_steps == kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return values

        loop.train_step = killed  # a process of our own: nothing to restore
    run(RunConfig(**settings))


_KILLABLE = """
import importlib, json, sys
import torch
from tests.megatron_cpu import apply_cpu_patches
apply_cpu_patches()
torch._dynamo.config.disable = True
module, function = sys.argv[1].split(":")
getattr(importlib.import_module(module), function)(*json.loads(sys.argv[2]))
"""


def run_killable(target: str, *args, timeout: float = 900) -> int:
    """`module:function`(*args) (JSON arguments) in a fresh interpreter under the CPU patches, in a session of its
    own; its exit status (-9: killed). Once it has ended its whole process group is killed: megatron-core's
    checkpoint writer starts a multiprocessing Manager that would outlive a SIGKILLed process forever."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    process = subprocess.Popen([sys.executable, "-c", _KILLABLE, target, json.dumps(args)], cwd=root, env=env,
                               start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
