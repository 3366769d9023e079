"""Reading Megatron-Core `torch_dist` checkpoints (PyTorch DCP) without running code from them.

A checkpoint holds three kinds of serialized Python: `.metadata` (a plain pickle DCP writes with the default
protocol), the tensor chunks and object entries inside `__*.distcp` (torch.save archives), and `common.pt`.
torch's DCP reader and megatron-core's loader unpickle `.metadata` with a bare `pickle.load`, and DCP's default
planner loads object entries with `torch.load(weights_only=False)`: a crafted checkpoint runs code in both. Here:

- `.metadata` goes through an unpickler that admits the named DCP metadata classes only, by exact
  `module.qualname` (never a module, a dotted attribute path, getattr or a builtin function), and is then checked
  for shape: every storage entry a plain file of the checkpoint, its byte range inside that file.
  torch's own weights_only unpickler would be the natural tool, but it parses pickle protocol 2 only (it stops
  at the FRAME opcode of every real `.metadata`), so we apply its rule -- named, registered globals only --
  in a `pickle.Unpickler.find_class`, which is the one place the pickle machine resolves a global.
- Tensor chunks and object entries are read with `torch.load(weights_only=True)` (torch's restricted
  unpickler; the archives are protocol 2).

`ChunkReader` reads chunks of any TP/PP/EP layout through DCP's public planner/storage interfaces; `load_sharded`
fills a megatron-core sharded state dict from it, so loading a converted checkpoint never hands the files to a
loader that unpickles freely.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_m2d.errors import M2DError

METADATA = ".metadata"
# the metadata of a 235B-parameter MoE at EP 64 is tens of MB; anything this large is not a DCP index
MAX_METADATA_BYTES = 1 << 30

# What DCP (torch 2.4 ... 2.13) and megatron-core (0.16, 0.19: their saves add the local plans) pickle into
# `.metadata`: dataclasses and enums of plain values. Admitted by exact name; nothing else resolves.
_DCP_CLASSES = (
    dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta, dcp_metadata.TensorProperties,
    dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata,
    dcp_metadata._MEM_FORMAT_ENCODING, dcp_filesystem._StorageInfo, dcp_filesystem._StoragePrefix,
    dcp_planner.SavePlan, dcp_planner.WriteItem, dcp_planner.WriteItemType, dcp_planner.TensorWriteData,
    torch.Size, torch.device, pathlib.PosixPath, pathlib.PurePosixPath,
)
SAFE_METADATA_GLOBALS: dict[str, Any] = {f"{c.__module__}.{c.__qualname__}": c for c in _DCP_CLASSES}
SAFE_METADATA_GLOBALS.update({str(t): t for t in vars(torch).values() if isinstance(t, torch.dtype)})
# a layout is pickled as a call of this name -> layout lookup; torch's weights_only allowlist admits it too
SAFE_METADATA_GLOBALS["torch.serialization._get_layout"] = torch.serialization._get_layout
# megatron-core stores object entries as torch.save([obj]); TE's extra state may be a BytesIO (megatron-core
# registers the same class as safe for its own loads)
SAFE_OBJECT_GLOBALS = [io.BytesIO]


class _NamedGlobalsOnly(pickle.Unpickler):
    """Resolves a pickle's globals from SAFE_METADATA_GLOBALS by exact name. Every callable a pickle can call
    (REDUCE, NEWOBJ, BUILD's __setstate__) comes from here or is a method of an object built from here; the
    default persistent_load refuses persistent ids."""

    def find_class(self, module: str, name: str):
        found = SAFE_METADATA_GLOBALS.get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


class _Refused(Exception):
    pass


def read_metadata(checkpoint: str | Path) -> Metadata:
    """The DCP metadata of `checkpoint`, unpickled with named classes only and checked against its files."""
    checkpoint = Path(checkpoint)
    path = checkpoint / METADATA
    if not path.is_file():
        raise M2DError(f"{checkpoint} is not a Megatron distributed checkpoint (no {METADATA})")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise M2DError(f"{path} is {path.stat().st_size:,} bytes, too large for DCP checkpoint metadata")
    # read into memory first: a length field in crafted bytes cannot then make the reader allocate it
    data = path.read_bytes()
    try:
        metadata = _NamedGlobalsOnly(io.BytesIO(data)).load()
    except _Refused as refused:
        raise M2DError(f"refusing to load {path}: it names {refused}, which is not DCP checkpoint metadata "
                       "(a crafted or foreign pickle)") from None
    except Exception as exc:  # noqa: BLE001 -- any bytes: the pickle machine raises a dozen kinds
        raise M2DError(f"{path} is not readable DCP metadata ({_first_line(exc)})") from None
    try:
        _check_structure(metadata, checkpoint)
    except (AttributeError, TypeError, ValueError) as exc:  # objects built without their fields (no BUILD state)
        raise M2DError(f"{path} is not valid DCP metadata ({_first_line(exc)})") from None
    return metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _is_size(value, dims: int | None = None) -> bool:
    return (isinstance(value, torch.Size) and all(type(n) is int and n >= 0 for n in value)
            and (dims is None or len(value) == dims))


def _check_structure(metadata, checkpoint: Path) -> None:
    """Everything the reader will trust: types, shapes within bounds, byte ranges inside the checkpoint's files.
    A crafted `.metadata` must not steer reads outside the directory (`../`) or past the end of a file."""
    where = checkpoint / METADATA

    def bad(what: str):
        raise M2DError(f"{where} is not valid DCP metadata: {what}")

    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        bad("no state_dict_metadata / storage_data")
    for key, stored in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            bad(f"key {key!r}")
        if isinstance(stored, BytesStorageMetadata):
            continue
        if not isinstance(stored, TensorStorageMetadata) or not _is_size(stored.size) \
                or not isinstance(getattr(stored.properties, "dtype", None), torch.dtype) \
                or not isinstance(stored.chunks, list):
            bad(f"entry {key}")
        for chunk in stored.chunks:
            if not isinstance(chunk, ChunkStorageMetadata) or not _is_size(chunk.offsets, len(stored.size)) \
                    or not _is_size(chunk.sizes, len(stored.size)) \
                    or any(o + n > d for o, n, d in zip(chunk.offsets, chunk.sizes, stored.size)):
                bad(f"chunk of {key} outside its tensor {tuple(stored.size)}")
    file_sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, dcp_filesystem._StorageInfo):
            bad(f"storage entry {index!r}")
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            bad(f"storage file {name!r} is not a file name inside the checkpoint")
        if getattr(info, "transform_descriptors", None):
            bad(f"{index.fqn} is stored through transforms {info.transform_descriptors!r}, which m2d does not read")
        if name not in file_sizes:
            file = checkpoint / name
            if not file.is_file():
                raise M2DError(f"{checkpoint} is incomplete: {name} is missing")
            file_sizes[name] = file.stat().st_size
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0 \
                or info.offset + info.length > file_sizes[name]:
            raise M2DError(f"{checkpoint / name} is truncated or corrupt: {index.fqn} lies at bytes "
                           f"{info.offset}..{info.offset + info.length} of {file_sizes[name]}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read as above (DCP's own unpickles it freely)."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            self._metadata = read_metadata(self.path)
            if getattr(self._metadata, "storage_meta", None) is not None:
                self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def load_object(data: io.BytesIO, key: str) -> Any:
    """One object entry (megatron-core: torch.save([obj]) bytes) through torch's restricted unpickler."""
    try:
        with torch.serialization.safe_globals(SAFE_OBJECT_GLOBALS):
            return torch.load(data, weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- refused globals and corrupt archives alike
        raise M2DError(f"refusing checkpoint object {key}: {_first_line(exc)}") from None


class _ChunkLoadPlanner(LoadPlanner):
    """Reads the requested (key, offsets) -> destination tensors, resharding from whatever chunks were saved,
    and the requested object entries (key -> their unpickled value)."""

    def __init__(self, requests: dict[tuple[str, tuple[int, ...]], torch.Tensor], objects: Iterable[str] = ()):
        self.requests = requests
        self.object_keys = list(objects)
        self.objects: dict[str, Any] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offsets), dest in self.requests.items():
            stored = self.metadata.state_dict_metadata.get(key)
            if not isinstance(stored, TensorStorageMetadata):
                raise M2DError(f"checkpoint has no tensor {key!r}")
            if len(offsets) != len(stored.size) or any(o + n > d for o, n, d in zip(offsets, dest.shape, stored.size)):
                raise M2DError(f"checkpoint tensor {key!r} has shape {tuple(stored.size)}, the model reads "
                               f"{tuple(dest.shape)} at {offsets}")
            chunk = ChunkStorageMetadata(torch.Size(offsets), dest.shape)
            items += create_read_items_for_chunk_list(key, stored, [chunk])  # dest_index = (key, offsets)
        for key in self.object_keys:
            if not isinstance(self.metadata.state_dict_metadata.get(key), BytesStorageMetadata):
                raise M2DError(f"checkpoint has no object {key!r}")
            index, zero = MetadataIndex(key), torch.Size([0])
            items.append(ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, zero))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        key = read_item.dest_index.fqn
        self.objects[key] = load_object(value, key)

    def resolve_tensor(self, read_item):
        dest = self.requests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination; the reader copied into it


class ChunkReader:
    """Reads chunks of a `torch_dist` checkpoint (ours or one Megatron saved under any TP/PP/EP)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = SafeFileSystemReader(self.path)
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, True)

    def keys(self) -> Iterable[str]:
        return self.metadata.state_dict_metadata.keys()

    def global_shape(self, key: str) -> tuple[int, ...] | None:
        stored = self.metadata.state_dict_metadata.get(key)
        return tuple(stored.size) if isinstance(stored, TensorStorageMetadata) else None

    def read(self, chunks, objects: Iterable[str] = ()) -> dict:
        """{(key, offsets): tensor} for `chunks` (anything with key, offsets, sizes, dtype), plus {key: value}
        for the object entries named in `objects`."""
        requests = {(c.key, tuple(c.offsets)): torch.empty(c.sizes, dtype=c.dtype) for c in chunks}
        planner = _ChunkLoadPlanner(requests, objects)
        planner.set_up_planner({}, self.metadata, True)
        plan = self.reader.prepare_local_plan(planner.create_local_plan())
        plan = planner.finish_plan(self.reader.prepare_global_plan([plan])[0])
        try:
            self.reader.read_data(plan, planner).wait()
        except M2DError:
            raise
        except Exception as exc:  # noqa: BLE001 -- corrupt chunk bytes surface as many torch error types
            raise M2DError(f"{self.path} holds corrupt or truncated chunk data ({_first_line(exc)})") from None
        return {**requests, **planner.objects}


def load_sharded(reader: ChunkReader, sharded_state_dict: dict) -> dict:
    """What megatron-core's `dist_checkpointing.load` returns for `sharded_state_dict` (factories merged back,
    non-persistent entries kept), read through `reader`: megatron-core's own file reading unpickles `.metadata`
    and object entries freely, so only its state-dict logic is used here."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    sharded, nonpersistent, factories = load_preprocess(sharded_state_dict)
    leaves = list(nested_values(sharded))
    chunks = {(t.key, tuple(t.global_offset)): _TensorRequest(t) for t in leaves if isinstance(t, ShardedTensor)}
    values = reader.read(chunks.values(), [o.unique_key for o in leaves if isinstance(o, ShardedObject)])

    def fill(leaf):
        if isinstance(leaf, ShardedTensor):
            tensor = values[(leaf.key, tuple(leaf.global_offset))].reshape(leaf.local_shape)
            return tensor.flatten()[leaf.flattened_range] if leaf.flattened_range is not None else tensor
        if isinstance(leaf, ShardedObject):  # stored as torch.save([obj])
            value = values[leaf.unique_key]
            return value[0] if isinstance(value, list) and len(value) == 1 else value
        return leaf

    dict_list_map_inplace(fill, sharded)
    merge(sharded, nonpersistent)
    return apply_factory_merges(sharded, factories)


class _TensorRequest:
    """A ShardedTensor's local chunk as ChunkReader reads it: the prepended (layer / expert) axes are size 1."""

    def __init__(self, tensor):
        self.key, self.offsets, self.dtype = tensor.key, tuple(tensor.global_offset), tensor.dtype
        self.sizes = (1,) * tensor.prepend_axis_num + tuple(tensor.local_shape)
