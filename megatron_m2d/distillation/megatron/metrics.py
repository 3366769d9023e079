"""What a distillation run reports: one stdout line per logged step and one progress bar (from one rank),
TensorBoard event files, Weights & Biases when installed and asked for, and `metrics.jsonl` (one JSON row per
logged step: what tests and plots read).

Throughput: tokens/s over the interval since the previous log; model TFLOP/s = tokens/s x FLOPs per token (the
formula: `megatron_m2d.planning.flops`, stated in `flops_per_token` below), per device = / world size; MFU =
per-device TFLOP/s / the device's stated peak (`peak_tflops`).

A resumed run truncates `metrics.jsonl` to the steps its checkpoint had done and tells TensorBoard to purge the
events after them (SummaryWriter's purge_step), so the steps it redoes never appear twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from megatron_m2d.distillation.state import keep_log_until
from megatron_m2d.errors import M2DError

METRICS_FILE, TENSORBOARD_DIR, WANDB_ID_FILE = "metrics.jsonl", "tensorboard", "wandb-run-id"
LOSSES = ("loss", "kd_loss", "lm_loss")


def check_finite(step: int, values: dict) -> None:
    """A non-finite loss or gradient norm stops the run (the loop calls this every step, before any save, so the
    last checkpoint kept is the last good one)."""
    bad = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not math.isfinite(v)}
    if bad:
        names = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise M2DError(f"non-finite {names} at step {step}: stopping; the checkpoints saved before it are kept")


def measured_cpu_tflops(seconds: float = 0.3) -> float:
    """This process's fp32 matmul throughput (all its threads), the CPU's stand-in for a datasheet peak."""
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def peak_tflops(given: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where it comes from): given; else the GPU's dense bf16 tensor-core peak from
    the planner's table (the planner's convention: FP8 runs are stated against it too); on CPU, measured."""
    from megatron_m2d.planning.layout import ACCELERATORS

    if given:
        return float(given), "given"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        variant = any(v in name for v in ("PCIe", "NVL"))  # other clocks than the table's SXM parts
        for key, accelerator in ACCELERATORS.items():
            if key in name.lower() and not variant:
                return accelerator.peak_flops / 1e12, f"{accelerator.name} dense bf16 datasheet peak"
        raise M2DError(f"no peak TFLOP/s known for {name}: give --peak-tflops for the MFU")
    return measured_cpu_tflops(), "measured fp32 matmul on this CPU"


def flops_per_token(student_dir, teacher_dir, seq_len: int, teacher_top_k: int | None = None) -> float:
    """Model FLOPs per trained token: the student's training (forward + backward = 3 x forward: 6 N + causal
    attention) plus the teacher's forward (2 N_active + causal attention), N counting the matmul weights a token
    meets (routed experts at top-k of them, the output layer; not the embedding lookup), attention as the two
    batched products over the keys a token sees under the causal mask. The arithmetic is the planner's
    (`planning.flops`), so the MFU logged and the one planned agree."""
    from megatron_m2d.planning.flops import step_flops
    from megatron_m2d.planning.shapes import ModelShape

    return float(step_flops(ModelShape.from_dir(student_dir), ModelShape.from_dir(teacher_dir), seq_len,
                            teacher_top_k).total)


class MetricsLogger:
    """Every rank constructs it; only the one with `rank0` True writes or prints. `start_step`: the step a
    resumed run continues from (0 for a new run)."""

    def __init__(self, out_dir, config, rank0: bool, start_step: int = 0, flops_per_token: float | None = None,
                 world_size: int = 1, peak: tuple[float, str] | None = None):
        self.rank0, self.config, self.out = rank0, config, Path(out_dir)
        self.tokens_per_step = int(config.global_batch) * int(config.seq_len)
        self.flops_per_token, self.world_size = flops_per_token, max(1, world_size)
        self.peak = peak
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.tensorboard = self.wandb = self.bar = None
        if not rank0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        keep_log_until(self.out / METRICS_FILE, start_step)  # a killed run may have logged steps past its checkpoint
        self.rows = open(self.out / METRICS_FILE, "a")
        if getattr(config, "tensorboard", False):
            from torch.utils.tensorboard import SummaryWriter

            # events of steps after the checkpoint (a killed run logged them) are purged from the view
            self.tensorboard = SummaryWriter(str(self.out / TENSORBOARD_DIR), purge_step=start_step + 1)
        if getattr(config, "wandb_project", None):
            self.wandb = _start_wandb(self.out, config, start_step)
        self.bar = tqdm(total=config.steps, initial=start_step, unit="step", desc="distill", dynamic_ncols=True)
        if peak is not None:
            self.bar.write(f"MFU against {peak[0]:.1f} TFLOP/s per device ({peak[1]}); "
                           f"{(flops_per_token or 0) / 1e9:.3f} GFLOP per token (student 6N + attention, "
                           "teacher 2N_active + attention)")

    def progress(self, step: int) -> None:
        """Move the progress bar (every step; cheap)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def throughput(self, step: int) -> dict:
        now = time.perf_counter()
        elapsed, steps = now - self.last_time, step - self.last_step
        self.last_step, self.last_time = step, now
        if steps <= 0 or elapsed <= 0:
            return {}
        tokens_per_s = steps * self.tokens_per_step / elapsed
        values = {"tokens_per_s": tokens_per_s}
        if self.flops_per_token:
            values["tflops_per_device"] = tokens_per_s * self.flops_per_token / 1e12 / self.world_size
            if self.peak:
                values["mfu"] = values["tflops_per_device"] / self.peak[0]
        return values

    def log_train(self, step: int, values: dict) -> None:
        """`values`: loss, kd_loss, lm_loss, lr, grad_norm (floats, identical on every rank). Adds throughput."""
        check_finite(step, values)
        values = {**values, **self.throughput(step)}
        self._emit("train", step, values)
        if self.bar is not None:
            self.progress(step)
            self.bar.write(_line(step, self.config.steps, values))

    def log_valid(self, step: int, values: dict) -> None:
        check_finite(step, values)
        self._emit("valid", step, values)
        if self.bar is not None:
            self.bar.write(f"step {step:>{len(str(self.config.steps))}} | validation | "
                           + " | ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in values.items()
                                        if k in LOSSES))

    def _emit(self, split: str, step: int, values: dict) -> None:
        if not self.rank0:
            return
        self.rows.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        self.rows.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"{split}/{key}", value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if not self.rank0:
            return
        self.rows.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()


def _line(step: int, steps: int, v: dict) -> str:
    parts = [f"step {step:>{len(str(steps))}}/{steps}"]
    parts += [f"{k.removesuffix('_loss')} {v[k]:.4f}" for k in LOSSES if k in v]
    if "lr" in v:
        parts.append(f"lr {v['lr']:.3e}")
    if "grad_norm" in v:
        parts.append(f"grad {v['grad_norm']:.3f}")
    if "tokens_per_s" in v:
        parts.append(f"{v['tokens_per_s']:,.0f} tok/s")
    if "tflops_per_device" in v:
        parts.append(f"{v['tflops_per_device']:.2f} TFLOP/s/dev")
    if "mfu" in v:
        parts.append(f"MFU {100 * v['mfu']:.1f}%")
    return " | ".join(parts)


def _start_wandb(out: Path, config, start_step: int):
    """The same W&B run across resumes (its id is kept in the run directory), rewound to the checkpoint's step
    where wandb supports it (`resume_from`), so redone steps are not logged twice."""
    try:
        import wandb
    except ImportError:
        raise M2DError(f"--wandb-project {config.wandb_project} given but wandb is not installed "
                       "(pip install wandb)") from None
    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    settings = dict(project=config.wandb_project, config=config.to_dict(), dir=str(out), name=out.name)
    if start_step > 0:
        try:
            return wandb.init(**settings, resume_from=f"{run_id}?_step={start_step}")
        except TypeError:  # wandb < 0.17.1 cannot rewind: steps <= its last one are dropped with its warning
            return wandb.init(**settings, id=run_id, resume="allow")
    return wandb.init(**settings, id=run_id)
