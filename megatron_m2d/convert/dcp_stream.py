"""Megatron-Core's `torch_dist` checkpoint format, written and read one tensor at a time.

megatron-core's own `dist_checkpointing.save` needs the whole model materialised (and, in 0.16.1, CUDA); a 30B
teacher must convert on a machine with less RAM than the model. The format is PyTorch Distributed Checkpoint
(DCP) under Megatron's keys plus two small files, so we drive DCP's public planner/storage interfaces directly:
the plan (keys, global shapes, chunk offsets) comes from the Megatron model built on the meta device, and each
chunk's data is computed from the HF shards only when the writer asks for it, in model order, a bounded number of
bytes per file. Reading back uses DCP's resharding reads, so any TP/PP/EP layout Megatron saved is readable.

On disk: `.metadata` (DCP, pickled by torch), `__{rank}_{n}.distcp`, `metadata.json` (Megatron's backend tag) and
`common.pt` (Megatron's non-sharded state, empty for a bare model). Reading back is `dcp_read`, which unpickles
nothing from these files but named DCP classes and torch's weights_only archives.
"""

from __future__ import annotations

import io
import json
import math
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megatron_m2d.errors import M2DError

# The DCP writer holds a file's chunks until the file is closed: this bounds conversion memory (a 30B model in
# bf16 makes ~240 files).
FILE_BYTES = 256 << 20
MEGATRON_BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                    "common_backend_version": 1}


@dataclass(frozen=True)
class Chunk:
    """One main-replica chunk of one model parameter, as Megatron's sharded state dict describes it. The global
    tensor of a key is the unsharded (TP1) parameter with the layer / expert axes prepended, so a chunk is a
    plain slice of the full parameter whatever TP/EP/PP wrote it."""
    key: str  # checkpoint key (shared by all layers / experts when those are prepended axes)
    offsets: tuple[int, ...]  # position in the global tensor, prepended axes included
    sizes: tuple[int, ...]  # its extent (1 along prepended axes)
    global_shape: tuple[int, ...]
    prepend: int  # number of prepended (layer / expert) axes
    dtype: torch.dtype
    param: str  # the full parameter's name, with global layer and expert numbers (the family tables' names)

    @property
    def param_shape(self) -> tuple[int, ...]:
        return self.global_shape[self.prepend:]

    def _slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offsets[self.prepend:], self.sizes[self.prepend:]))

    def take(self, param: torch.Tensor) -> torch.Tensor:
        """This chunk's values out of the full parameter."""
        return param[self._slices()].reshape(self.sizes)

    def put(self, param: torch.Tensor, values: torch.Tensor) -> None:
        param[self._slices()] = values.reshape(self.sizes[self.prepend:])


@dataclass(frozen=True)
class ObjectChunk:
    """A non-tensor entry (a layer's `_extra_state`): stored as torch.save([data]) bytes, as Megatron does."""
    key: str
    data: Any


def model_chunks(model) -> tuple[list[Chunk], list[ObjectChunk]]:
    """This rank's main-replica chunks of a Megatron model (built on the meta device: nothing is allocated)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor, apply_factories,
                                                          is_main_replica)

    sharded = model.sharded_state_dict()
    apply_factories(sharded)  # e.g. SwiGLU fc1 -> separate gate and up chunks (they shard separately under TP)
    chunks, objects = [], []
    for name, value in sharded.items():
        for item in nested_values([value]):
            if not is_main_replica(item.replica_id):
                continue
            if isinstance(item, ShardedObject):
                objects.append(ObjectChunk(item.unique_key, item.data))
                continue
            if not isinstance(item, ShardedTensor) or item.flattened_range is not None:
                raise M2DError(f"internal error: unexpected sharded entry {type(item).__name__} for {name}")
            sizes = (1,) * item.prepend_axis_num + tuple(item.local_shape)
            chunks.append(Chunk(item.key, tuple(item.global_offset), sizes, tuple(item.global_shape),
                                item.prepend_axis_num, item.data.dtype, _global_name(name, item)))
    return chunks, objects


def _global_name(name: str, item) -> str:
    """A rank's parameter names count its own layers and experts from 0 (pipeline / expert parallel). The
    global numbers are in the checkpoint key (`decoder.layers.3.` when layers differ, e.g. dense and MoE) or
    along its prepended axes (layer first, expert last)."""
    parts, key = name.split("."), item.key.split(".")
    prepended = list(item.global_offset[:item.prepend_axis_num])
    if "local_experts" in parts:
        parts[parts.index("local_experts") + 1] = str(prepended.pop())
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = key[2] if len(key) > 2 and key[2].isdigit() else str(prepended.pop(0))
    return ".".join(parts)


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans the chunks given up front; `resolve_data` computes each chunk only when the writer reaches it."""

    def __init__(self, chunks: list[Chunk], objects: list[ObjectChunk], compute: Callable[[Chunk], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, c.offsets): c for c in chunks}
        self._objects = {o.key: o for o in objects}
        self._items = [WriteItem(index=MetadataIndex(o.key), type=WriteItemType.BYTE_IO) for o in objects]
        self._items += [WriteItem(index=MetadataIndex(c.key, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                                  tensor_data=TensorWriteData(
                                      chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                                      properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape)))
                        for c in chunks]
        self._compute = compute

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn].data], buffer)
            return buffer
        return self._compute(self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))])


class _BoundedFileWriter(FileSystemWriter):
    """DCP's writer keeps every tensor of a file alive until the file is closed, and orders one file per rank by
    size: we cut files at `max_bytes` in plan (= model) order, so memory stays one file's worth."""

    def __init__(self, path, max_bytes: int):
        super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=1,
                         per_thread_copy_ahead=0)
        self.max_bytes = max_bytes

    def write_data(self, plan, planner):
        if not hasattr(self, "_write_data"):  # torch moved its (private) file queue: fall back to a file per chunk
            self.single_file_per_rank = False
            return super().write_data(plan, planner)
        files: queue.Queue = queue.Queue()
        bucket, size, count = [], 0, 0

        def flush():
            nonlocal bucket, size, count
            if bucket:
                name = f"{plan.storage_data.prefix}{count}.distcp"
                files.put((self.fs.concat_path(self.path, name), name, bucket))
                bucket, size, count = [], 0, count + 1

        for item in plan.items:
            item_bytes = 0 if item.type == WriteItemType.BYTE_IO else (  # the chunk's bytes, not the global tensor's
                math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize)
            if size and size + item_bytes > self.max_bytes:
                flush()
            bucket.append(item)
            size += item_bytes
        flush()
        return self._write_data(planner, files)


def save_streaming(path: Path, chunks: list[Chunk], objects: list[ObjectChunk],
                   compute: Callable[[Chunk], torch.Tensor], process_group=None,
                   max_file_bytes: int = FILE_BYTES) -> None:
    """Write a Megatron `torch_dist` checkpoint whose chunk data `compute` produces on demand. Collective over
    `process_group` when given (each rank passes its own chunks; the coordinator writes the metadata)."""
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True, exist_ok=True)
    try:
        dcp.save({}, storage_writer=_BoundedFileWriter(path, max_file_bytes),
                 planner=_StreamingSavePlanner(chunks, objects, compute), process_group=process_group,
                 no_dist=process_group is None)
    except CheckpointException as exc:  # DCP wraps what `compute` raised (a NaN weight): the user needs that line
        for failure in exc.failures.values():
            original = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(original, M2DError):
                raise M2DError(str(original)) from None
        raise
    rank = torch.distributed.get_rank(process_group) if process_group is not None else 0
    if rank == 0:
        (path / "metadata.json").write_text(json.dumps(MEGATRON_BACKEND))
        torch.save({}, path / "common.pt")  # Megatron's loader expects it; nothing of a bare model is common
