"""The dataset index cache in the run directory: what megatron-core left there is checked before it is trusted.

megatron-core writes its sample indices (.npy) without a temporary file and takes a set whose files all exist
for a complete one, so a run killed while writing leaves a truncated .npy that every later start fails on. It
also loads them with `allow_pickle=True`, so an object array placed there would run code. Rank 0 checks each
.npy's header and size first (no unpickling: the header is a Python literal) and removes any set holding a
broken file, so the builder writes that set again. The cache is ours (the run directory), never the user's data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def drop_unreadable_indices(cache_dir: Path) -> list[Path]:
    """Remove every index set of `cache_dir` (files "<hash>-<Class>-<split>-*") with an unreadable .npy; returns
    the files removed."""
    broken = {path.name.rsplit("-", 1)[0] for path in cache_dir.glob("*.npy") if not _readable_npy(path)}
    removed = [path for path in cache_dir.iterdir() if path.name.rsplit("-", 1)[0] in broken]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _readable_npy(path: Path) -> bool:
    """A plain (non-object) array whose file holds exactly the bytes its header promises."""
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return False
            shape, _, dtype = read_header(handle, max_header_size=10_000)
            data_start = handle.tell()
        if dtype.hasobject:
            return False
        return path.stat().st_size == data_start + int(np.prod(shape, dtype=object)) * dtype.itemsize
    except (OSError, ValueError, TypeError, SyntaxError):
        return False
