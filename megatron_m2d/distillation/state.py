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
from safetensors.torch import load_file, save_file

from megatron_m2d.errors import M2DError
from megatron_m2d.io.writer import ordinary_permissions

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
    """Restore AdamW moments into `optimizer` (whose param groups are already set); returns the JSON state."""
    try:
        meta = json.loads((directory / "trainer_state.json").read_text())
        tensors = load_file(directory / "optimizer.safetensors")
    except (OSError, json.JSONDecodeError) as exc:
        raise M2DError(f"cannot resume from {directory}: {exc}") from None
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = torch.tensor(value)
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    return meta


def latest_checkpoint(root: Path) -> Path | None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                   and (p / "trainer_state.json").exists())
    return steps[-1] if steps else None
