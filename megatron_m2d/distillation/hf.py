"""`m2d distill --backend hf`: forward-KL logit distillation of the dense student from the MoE teacher in plain
PyTorch + transformers, single process or torchrun DDP. The small-scale path (the demo runs it on CPU) and the
reference the Megatron path is checked against.

Loss per token: kd_weight * T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - kd_weight) * CE(next token),
averaged over tokens. The KL is nvidia-modelopt's LogitsDistillationLoss when modelopt is installed.
Data: the source's `train` documents packed into blocks; block order is a seeded permutation per epoch, so the
batch of every step is a function of (seed, step) and a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from megatron_m2d.data.text import token_blocks
from megatron_m2d.distillation.state import (SCHEDULES, checkpoints_newest_first, keep_log_until, learning_rate,
                                             load_training_state, read_step, remove_unfinished,
                                             save_training_state)
from megatron_m2d.errors import M2DError
from megatron_m2d.evaluation.perplexity import load_model
from megatron_m2d.io.checkpoint import load_tokenizer
from megatron_m2d.io.model_card import (Distillation, add_distillation, new_card, public_name, read_card,
                                         weights_dtype, write_card)
from megatron_m2d.io.writer import atomic_directory
from megatron_m2d.validation import check_numbers, check_output


@dataclass
class DistillConfig:
    steps: int = 200
    seq_len: int = 256
    micro_batch: int = 8  # sequences per forward, per process
    grad_accum: int = 1  # micro-batches per optimizer step, per process
    lr: float = 1e-4
    min_lr: float = 1e-5
    schedule: str = "wsd"
    warmup: int | None = None  # linear warmup steps (None: 10 % of the steps, so it never exceeds them)
    decay: int = 0  # wsd: steps of the final decay (0: the last 10 %)
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    temperature: float = 1.0
    kd_weight: float = 1.0  # 1: pure KD; below 1 mixes in the LM loss (SlimQwen)
    teacher_top_k: int | None = None  # run the MoE teacher with more active experts (paper: 2 x top-k)
    train_tokens: int = 2_000_000  # tokens of the training source packed into blocks
    seed: int = 0
    save_every: int = 100
    log_every: int = 10

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise M2DError(f"unknown schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        check_numbers(self)  # the CLI's rules for these names (ranges, finite, min-lr <= lr), from the API too
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise M2DError(f"--warmup {self.warmup} must lie in [0, --steps {self.steps}]")

    def resolved_warmup(self) -> int:
        return self.steps // 10 if self.warmup is None else self.warmup


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token forward KL(teacher || student) x T^2, [B, S]."""
    try:  # the field's implementation when installed; reduction='none' keeps one value per token
        with warnings.catch_warnings():  # its import notices (Apex missing, untested transformers) are not ours
            warnings.simplefilter("ignore")
            from modelopt.torch.distill import LogitsDistillationLoss

        return LogitsDistillationLoss(temperature, reduction="none")(student_logits.float(), teacher_logits.float())
    except ImportError:  # the same formula, so CI without modelopt trains identically
        log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        p_t = F.softmax(teacher_logits.float() / temperature, dim=-1)
        return F.kl_div(log_s, p_t, reduction="none").sum(-1) * temperature**2


def micro_batch_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                     kd_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, lm) of a micro-batch: the KD term averaged over all its tokens, the LM term over the tokens
    that have a next token in the block. The Megatron backend (distillation/megatron/loss.py) averages alike."""
    kd = kd_loss(logits, teacher_logits, temperature).mean()
    lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return kd_weight * kd + (1 - kd_weight) * lm, kd, lm


def set_teacher_top_k(teacher, top_k: int | None) -> None:
    """Teacher top-k expansion: every router of the MoE teacher selects `top_k` experts."""
    if top_k is None:
        return
    routers = [m for m in teacher.modules() if hasattr(m, "top_k") and hasattr(m, "num_experts")]
    if not routers:
        raise M2DError("--teacher-top-k needs an MoE teacher")
    for router in routers:
        if top_k > router.num_experts:
            raise M2DError(f"--teacher-top-k {top_k} exceeds the teacher's {router.num_experts} experts")
        router.top_k = top_k


def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def distill(teacher: str | Path, student: str | Path, data: str, out: str | Path, config: DistillConfig,
            device: str = "auto", progress: bool = True) -> dict:
    """Distill `student` from `teacher` on `data`; checkpoints in out/checkpoints, the final HF model in
    out/model, the loss curve in out/log.jsonl. Started again with the same arguments, it resumes."""
    config.validate()
    rank, world = _distributed()
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out = Path(out)
    check_output(out, [("--teacher", teacher), ("--student", student), ("--data", data)])
    checkpoints = out / "checkpoints"
    torch.manual_seed(config.seed)
    teacher_model, tokenizer = load_model(teacher, device, dtype)
    set_teacher_top_k(teacher_model, config.teacher_top_k)
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    student_model, optimizer, resume_from = _load_student(checkpoints, student, device, config, rank)
    start = read_step(resume_from) if resume_from else 0
    student_tokenizer = load_tokenizer(student)
    if len(student_tokenizer) != len(tokenizer) or student_model.config.vocab_size != teacher_model.config.vocab_size:
        raise M2DError("teacher and student have different vocabularies")
    student_model.train()
    if resume_from and rank == 0 and progress:
        print(f"resuming from {resume_from} at step {start}")
    model = torch.nn.parallel.DistributedDataParallel(student_model) if world > 1 else student_model

    blocks = token_blocks(tokenizer, data, config.train_tokens, config.seq_len, config.seed, role="train")
    per_step = config.micro_batch * config.grad_accum * world
    decay = config.decay or max(1, config.steps // 10)
    created = rank == 0 and not out.exists()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        keep_log_until(out / "log.jsonl", start)  # a resumed run redoes the steps after its checkpoint
        (out / "distill_config.json").write_text(json.dumps(
            {**asdict(config), "teacher": str(teacher), "student": str(student), "data": data, "world": world,
             "train_blocks": len(blocks)}, indent=1))
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    bar = tqdm(range(start, config.steps), desc="distill", unit="step", initial=start, total=config.steps,
               disable=not progress or rank != 0)
    tick, tokens_seen = time.perf_counter(), 0
    recent = collections.deque(maxlen=10)  # the final loss the card states: a mean, since one step is noisy
    for step in bar:
        lr = learning_rate(step, config.steps, config.lr, config.min_lr, config.schedule, config.resolved_warmup(),
                           decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = _global_batch(blocks, step, per_step, config.seed)
        mine = batch[rank::world]  # each process its own share of the global batch
        totals = torch.zeros(3, dtype=torch.float64)
        for m, micro in enumerate(mine.split(config.micro_batch)):
            micro = micro.to(device)
            with torch.no_grad():
                teacher_logits = teacher_model(input_ids=micro).logits
            sync = world == 1 or m == config.grad_accum - 1  # all-reduce gradients once per step
            with model.no_sync() if not sync else contextlib.nullcontext():
                logits = model(input_ids=micro).logits
                loss, kd, lm = micro_batch_loss(logits, teacher_logits, micro, config.temperature, config.kd_weight)
                (loss / config.grad_accum).backward()
            totals += torch.tensor([loss.item(), kd.item(), lm.item()], dtype=torch.float64) / config.grad_accum
            if not torch.isfinite(totals).all():
                _stop_on_non_finite(step, teacher_logits, logits, totals, checkpoints, out, created)
        if config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(student_model.parameters(), config.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(totals)
            totals /= world
        tokens_seen += per_step * config.seq_len
        if rank == 0:
            record = {"step": step + 1, "lr": lr, "loss": float(totals[0]), "kd": float(totals[1]), "lm": float(totals[2])}
            log.write(json.dumps(record) + "\n")
            recent.append(record["kd"])
            log.flush()
            if step % config.log_every == 0 or step + 1 == config.steps:
                rate = tokens_seen / max(time.perf_counter() - tick, 1e-9)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                save_training_state(checkpoints / f"step_{step + 1:07d}", student_model, optimizer, step + 1,
                                    {"seed": config.seed}, student_tokenizer)
    if log:
        log.close()
    if rank == 0:
        with atomic_directory(out / "model", overwrite=True) as tmp:
            student_model.save_pretrained(tmp)
            student_tokenizer.save_pretrained(tmp)
            _write_card(Path(student), tmp, config, teacher, data, per_step * config.seq_len * config.steps,
                        {f"train KD, mean of the last {len(recent)} steps": sum(recent) / len(recent)}
                        if recent else {})
    if dist.is_initialized():
        dist.barrier()
    return {"steps": config.steps, "tokens": per_step * config.seq_len * config.steps, "model": str(out / "model")}


def _load_student(checkpoints: Path, student, device: str, config: DistillConfig, rank: int):
    """(student, AdamW, checkpoint resumed from): the newest readable checkpoint, or the student at step 0.
    An unreadable checkpoint (a crash mid-copy, a corrupt disk) is skipped with a warning for the one before."""
    if rank == 0:
        remove_unfinished(checkpoints)
    for candidate in [*checkpoints_newest_first(checkpoints), None]:
        try:
            model, _ = load_model(candidate or student, device, torch.float32)
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                          weight_decay=config.weight_decay)
            if candidate is not None:
                load_training_state(candidate, optimizer)
            return model, optimizer, candidate
        except M2DError as exc:
            if candidate is None:
                raise
            if rank == 0:
                print(f"m2d: warning: skipping unreadable checkpoint {candidate} ({exc}); trying the one before",
                      file=sys.stderr)


def _stop_on_non_finite(step: int, teacher_logits, logits, totals, checkpoints: Path, out: Path,
                        remove_run: bool) -> None:
    """NaN/inf is an error, never a result: stop before the optimizer step, so the last checkpoint stays the
    last good one (a run that saved none, started here, leaves nothing)."""
    what = ("teacher logits" if not torch.isfinite(teacher_logits).all() else
            "student logits" if not torch.isfinite(logits).all() else "loss")
    last = next(iter(checkpoints_newest_first(checkpoints)), None)
    if remove_run and last is None:
        shutil.rmtree(out, ignore_errors=True)
    raise M2DError(f"step {step + 1}: the {what} became NaN or infinite (loss {totals[0]:g}, kd {totals[1]:g}, "
                   f"lm {totals[2]:g}); stopped, " + (f"the last good checkpoint is {last}" if last else
                                                      "no checkpoint had been saved"))


def _global_batch(blocks: torch.Tensor, step: int, per_step: int, seed: int) -> torch.Tensor:
    """Blocks of optimizer step `step`: positions step*per_step ... of an endless, per-epoch reshuffled order."""
    n = len(blocks)
    orders: dict[int, torch.Tensor] = {}
    rows = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(blocks[orders[epoch][index]])
    return torch.stack(rows)


def _write_card(student: Path, out: Path, config: DistillConfig, teacher, data: str, tokens: int,
                losses: dict[str, float]) -> None:
    """The student's card (densify's, or a plain one for a student m2d did not make) with the distillation
    record in place of "not distilled", and the dtype the model was saved in; the plan travels along."""
    card = read_card(student) or new_card(
        teacher=teacher, teacher_dir=teacher, model_dir=out, name=out.parent.name,
        title=f"{public_name(student)} distilled from {public_name(teacher)}",
        summary=f"`{public_name(student)}` distilled from `{public_name(teacher)}` by megatron_m2d.", facts={}, made=[])
    settings = {"sequence length": config.seq_len, "global batch (sequences)": tokens // config.steps // config.seq_len,
                "learning rate": f"{config.lr:g} -> {config.min_lr:g} ({config.schedule})",
                "warmup / decay steps": f"{config.resolved_warmup()} / {config.decay or max(1, config.steps // 10)}",
                "loss": f"{config.kd_weight:g} x forward KL(teacher || student) at T = {config.temperature:g}"
                        + (f" + {1 - config.kd_weight:g} x LM loss" if config.kd_weight < 1 else ""),
                "teacher experts per token": config.teacher_top_k or "as trained",
                "optimizer": f"AdamW (0.9, 0.95), weight decay {config.weight_decay:g}, clip {config.clip_grad:g}",
                "seed": config.seed}
    record = Distillation(backend="PyTorch + transformers (`m2d distill --backend hf`)", teacher=str(teacher),
                          data=data, tokens=tokens, steps=config.steps, settings=settings, losses=losses)
    write_card(out, add_distillation(card, record, weights_dtype(out), f"{out.parent.name}/model"))
    for name in ("m2d_plan.json",):
        if (student / name).exists():
            (out / name).write_text((student / name).read_text())
