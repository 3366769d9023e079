"""Learning-rate schedules and resumable training state (safetensors + JSON, never pickles).

torch.save would pickle the optimizer; a checkpoint directory is something users copy around and load back,
so the AdamW moments go into safetensors and the scalars into JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_m2d.errors import M2DError
from megatron_m2d.io.writer import ordinary_permissions, write_text_atomically

SCHEDULES = ("wsd", "cosine", "constant")


def learning_rate(step: int, total: int, peak: float, minimum: float, schedule: str, warmup: int,
                  decay: int) -> float:
    """lr at optimizer step `step` (0-based). Linear warmup over `warmup` steps, then:
    wsd: constant until the last `decay` steps, then linear decay to `minimum` (warmup-stable-decay);
    cosine: cosine from peak to `minimum` over the remaining steps; constant: peak."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "wsd":
        start = total - decay
        if step < start:
            return peak
        return peak + (minimum - peak) * min(1.0, (step - start + 1) / max(decay, 1))
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))
    raise M2DError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


def save_training_state(directory: Path, model, optimizer: torch.optim.Optimizer, step: int, extra: dict,
                        tokenizer=None) -> None:
    """Write `directory` atomically: the student (HF format, with its tokenizer), AdamW state and `step`."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    tensors, scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{name}"] = value.contiguous()
            else:
                scalars[f"{index}.{name}"] = float(value)
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "scalars": scalars, **extra}, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    ordinary_permissions(tmp)
    os.replace(tmp, directory)


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore AdamW moments into `optimizer` (whose param groups are already set); returns the JSON state.
    Anything unreadable or not matching the optimizer is one M2DError (the caller falls back a checkpoint)."""
    try:
        meta = json.loads((directory / "trainer_state.json").read_text())
        tensors = load_file(directory / "optimizer.safetensors")
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for key, value in meta["scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = torch.tensor(value)
        if not all(torch.isfinite(v).all() for moments in state.values() for v in moments.values()):
            raise ValueError("non-finite optimizer state")
        current = optimizer.state_dict()
        optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
        if int(meta["step"]) < 1:
            raise ValueError(f"step {meta['step']}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:
        raise M2DError(f"cannot resume from {directory}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    return meta


def read_step(directory: Path) -> int:
    return int(json.loads((directory / "trainer_state.json").read_text())["step"])


def checkpoints_newest_first(root: Path) -> list[Path]:
    """Finished checkpoints (`step_N` with their state file), newest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                   and (p / "trainer_state.json").exists()), reverse=True)


def remove_unfinished(root: Path) -> None:
    """`step_N.tmp` directories a killed run was writing: never resumed from, so never left behind."""
    for tmp in root.glob("step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def keep_log_until(log: Path, step: int) -> None:
    """Drop the rows of steps after `step` (those a resumed run redoes), so every step has one row."""
    if not log.exists():
        return
    rows = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a row cut short by a kill
    write_text_atomically(log, "".join(row + "\n" for row in rows))
