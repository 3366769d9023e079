"""Writing outputs safely: a temporary sibling renamed into place, and sharded safetensors written as they come.

transformers' `save_pretrained` needs the whole model in memory; our dense export streams one layer at a time,
so shards are flushed as soon as they reach their size and the HF index is written at the end.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from megatron_m2d.errors import M2DError
from megatron_m2d.validation import check_output

# A shard is assembled in memory before it is written (safetensors puts the header first), so the shard size
# is part of densify's peak memory.
DEFAULT_SHARD_BYTES = 1024**3
SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
              "*.tiktoken", "chat_template*", "generation_config.json", "preprocessor_config.json")


def check_output_path(out: str | Path, overwrite: bool, inputs=()) -> Path:
    """`out` may be written: never over, into or around one of `inputs` (paths, named data sources, or
    (flag, path) pairs), in an existing writable folder, and replacing something only with --overwrite."""
    out = Path(out)
    check_output(out, inputs)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise M2DError(f"output path {out} exists; pass --overwrite to replace it")
    return out


def remove(path: Path) -> None:
    """Delete a file, a symlink (not its target) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_siblings(out: Path, tag: str = "tmp") -> None:
    """Remove `.NAME.<tag>-PID` work directories of runs that were killed (their process is gone): a rerun
    leaves nothing stale beside its output."""
    prefix = f".{out.name}.{tag}-"
    for sibling in out.parent.glob(glob.escape(prefix) + "*"):
        pid = sibling.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False, inputs=()):
    """Yield a temporary sibling directory; on success it replaces `out`, on any error it is removed."""
    out = check_output_path(out, overwrite, inputs)
    remove_stale_siblings(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ordinary_permissions(tmp)
    remove(out)
    os.replace(tmp, out)


def ordinary_permissions(directory: Path) -> None:
    """Files 0644 and folders 0755 (under the usual umask 022) throughout `directory`: safetensors and
    tempfile-based writers create 0600 files, which other users of a shared cluster then cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    Path(directory).chmod(0o777 & ~umask)
    for path in Path(directory).rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def removed_on_error(path: Path):
    """`path` is removed if the block fails (a refused run leaves nothing), kept if it is killed (to resume)."""
    try:
        yield path
    except Exception:
        remove(path)
        raise


@contextlib.contextmanager
def run_directory(out: Path, resumable: Callable[[Path], bool]):
    """The directory of a resumable run (sweep, distill), written in place: created if needed, and removed again
    if this run created it and fails before it holds anything worth resuming (a refused run leaves nothing).
    A kill or Ctrl-C keeps it: the rerun continues from it."""
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        yield out
    except Exception:
        if created and not resumable(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """A kill leaves the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class ShardedWriter:
    """Collects tensors and writes `model-0000i-of-0000n.safetensors` shards plus the HF index."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in shard for shard in self.shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        number = len(self.shards) + 1
        save_file(self.pending, self.directory / f"shard-{number:05d}.tmp", metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Give the shards their final names and write the index."""
        self.flush()
        count = len(self.shards)
        weight_map = {}
        for number, names in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{number:05d}.tmp", self.directory / final)
            weight_map.update({name: final for name in names})
        # Always an index, even for one shard: every HF loader and vLLM read it, and tools can rely on it.
        write_json(self.directory / "model.safetensors.index.json",
                   {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})


def copy_side_files(source: Path, out: Path) -> None:
    """What a runtime needs beside the weights: tokenizer files, chat templates, generation config. An
    allowlist, so the teacher's own records (its model card, training logs) are never passed off as the
    student's."""
    for path in source.iterdir():
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in SIDE_FILES):
            shutil.copy2(path, out / path.name)
