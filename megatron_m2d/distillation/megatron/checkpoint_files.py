"""The on-disk protocol of training checkpoints: names, the completion marker, atomic publication and deletion,
the student's files every checkpoint carries, and reading megatron-core's part without its loader. Nothing here
is collective (rank 0 publishes and prunes; every rank reads).

    root/step_0000200/            complete (COMPLETE written last, then the directory renamed into place)
    root/.step_0000300.tmp/       a save in progress, or one a kill interrupted (removed on the next start)
    root/.step_0000100.deleting/  being pruned (renamed first: a kill mid-deletion leaves nothing that looks whole)
    root/.step_0000200.unreadable/  set aside by a resume that could not read it (kept for inspection)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron_m2d import __version__
from megatron_m2d.convert.checkpoint import SIDE_FILES_DIR
from megatron_m2d.convert.dcp_read import ChunkReader, load_sharded
from megatron_m2d.convert.provider import META
from megatron_m2d.errors import M2DError

PREFIX, MARKER = "step_", "COMPLETE"
STATE_FILE, CONFIG_FILE, RNG_DIR = "train_state.json", "run_config.json", "rng"
RECORD_FILES = ("README.md", "m2d_plan.json")  # what densify wrote beside the student: its model card and plan
LEFTOVERS = (".tmp", ".deleting", ".replaced")
COMMON_FILE, COMMON_OBJECT = "common.pt", "common_state/shard_0_1"  # megatron-core <= 0.18 / 0.19


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def write_json(path: Path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise M2DError(f"{path.name}: {e}") from None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(path: Path, reason: str) -> Path:
    """Rename out of the loader's sight (atomic); deleted at once unless kept ("unreadable")."""
    aside = path.with_name(f".{path.name}.{reason}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    if reason != "unreadable":
        shutil.rmtree(aside, ignore_errors=True)
    return aside


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Mark `tmp` complete, rename it to `final` (replacing a stale checkpoint of the same step) and keep only the
    newest `keep` complete checkpoints."""
    (tmp / MARKER).write_text(f"{final.name}\n")
    _fsync_directory(tmp)
    stale = final.with_name(f".{final.name}.replaced")
    if final.exists():
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    _fsync_directory(final.parent)
    for old in complete_checkpoints(final.parent)[:-keep]:
        if old != final:
            set_aside(old, "deleting")
    shutil.rmtree(stale, ignore_errors=True)


def clean_leftovers(root: Path) -> None:
    """Saves and deletions a kill interrupted (never a complete checkpoint, nor one set aside as unreadable)."""
    for path in root.glob(f".{PREFIX}*"):
        if path.is_dir() and path.suffix in LEFTOVERS:
            shutil.rmtree(path, ignore_errors=True)


_STUDENT_KEYS: dict[Path, set[str]] = {}


def _model_keys(checkpoint: Path) -> set[str]:
    """Tensor keys of a checkpoint's model (everything but the optimizer's state)."""
    reader = ChunkReader(checkpoint)
    return {k for k in reader.keys() if reader.global_shape(k) is not None and not k.startswith("optimizer.")}


def check_student_keys(written: Path, student_dir: Path) -> None:
    """The model keys must be the converted student's: `m2d convert megatron-to-hf` then reads the checkpoint, and
    a teacher that leaked into the student's sharded state dict would show here."""
    if student_dir not in _STUDENT_KEYS:
        _STUDENT_KEYS[student_dir] = _model_keys(student_dir)
    ours, theirs = _model_keys(written), _STUDENT_KEYS[student_dir]
    if ours != theirs:
        raise M2DError(f"internal error: the checkpoint's model keys are not the converted student's (extra "
                       f"{sorted(ours - theirs)[:3]}, missing {sorted(theirs - ours)[:3]}): was the teacher saved?")


def write_student_files(tmp: Path, student_dir: Path, step: int, sizes: dict) -> None:
    """The converter's provider config (retargeted at the run's layout) and side files: tokenizer files and the
    densify record (model card and plan), which `m2d convert` keeps there; a student converted before it did gets
    them from its HF directory when that still has them."""
    meta = read_json(student_dir / META)
    write_json(tmp / META, {**meta, "parallel": sizes, "written_layout": sizes, "training_step": step,
                            "m2d_version": __version__})
    side = tmp / SIDE_FILES_DIR
    if (student_dir / SIDE_FILES_DIR).is_dir():
        shutil.copytree(student_dir / SIDE_FILES_DIR, side)
    side.mkdir(exist_ok=True)
    source = Path(meta["source"]) if meta.get("source") else None
    for name in RECORD_FILES:
        if not (side / name).exists() and source is not None and (source / name).is_file():
            shutil.copy2(source / name, side / name)


# ---- megatron-core's part, read without megatron-core's loader (it unpickles what it reads) --------------------

def _read_common(path: Path) -> dict:
    """megatron-core's non-sharded state (the optimizer's param groups and step): `common.pt` (<= 0.18) or the
    `common_state` object (0.19), through torch's restricted unpickler either way."""
    if (path / COMMON_FILE).is_file():
        try:
            return torch.load(path / COMMON_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # refused globals and corrupt archives alike
            lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "global" in line] or [str(e)]
            raise M2DError(f"refusing {COMMON_FILE}: {type(e).__name__}: {lines[0].strip()[:200]}") from None
    reader = ChunkReader(path)
    if COMMON_OBJECT not in reader.keys():
        return {}
    return reader.read([], [COMMON_OBJECT])[COMMON_OBJECT][0]  # stored as torch.save([state])


def _overlay(target, common):
    """The checkpoint's common values in place of the plain leaves of a freshly built state dict (megatron-core
    saved exactly those leaves as common state; its `merge` refuses two values for one leaf)."""
    if isinstance(target, dict) and isinstance(common, dict):
        for key, value in common.items():
            target[key] = _overlay(target[key], value) if key in target else value
        return target
    if isinstance(target, list) and isinstance(common, list) and len(target) == len(common):
        return [_overlay(t, c) for t, c in zip(target, common)]
    return common


def read_megatron_state(path: Path, sharded_state_dict: dict) -> dict:
    """What megatron-core's `dist_checkpointing.load` returns, read through our reader (megatron-core's
    unpickles freely): the sharded entries, then the checkpoint's common state over the plain leaves."""
    return _overlay(load_sharded(ChunkReader(path), sharded_state_dict), _read_common(path))
