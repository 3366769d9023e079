"""Checking an indexed dataset (PREFIX.bin + PREFIX.idx) before megatron-core reads it.

megatron-core's reader trusts its files: a truncated or corrupt .idx fails in an assert, a numpy error deep in a
memory map, or not at all (tokens read past the end of a document, a garbage count that makes the sample builder
loop). Every rank calls `check_prefix` before the dataset builder, so a bad prefix is one line on every rank
rather than a crash on rank 0 and a hang at the builder's barrier on the others. The checks read the index once
with numpy (about 20 bytes per document), never the tokens.

The .idx layout (megatron-core's _IndexWriter): 9-byte magic, u64 version 1, u8 dtype code, u64 sequence count
S, u64 document count D, then int32 lengths[S], int64 byte offsets[S], int64 document_indices[D].
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_m2d.errors import M2DError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# megatron-core's DType codes of integer types (6 and 7 are floats: not token ids)
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CHUNK = 1 << 22  # documents checked at a time


@dataclass(frozen=True)
class IndexSummary:
    prefix: str
    dtype: type
    sequence_lengths: np.ndarray  # int32, one per document (GPT: a document is one sequence), memory-mapped

    @property
    def documents(self) -> int:
        return len(self.sequence_lengths)

    def tokens(self, begin: int = 0, end: int | None = None) -> int:
        """Tokens in documents [begin, end)."""
        return int(self.sequence_lengths[begin:end].sum(dtype=np.int64))


def normalize_prefix(prefix: str | os.PathLike) -> str:
    """The absolute prefix. A path given with its .bin/.idx suffix is taken as the prefix it names."""
    text = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix) and not os.path.exists(text + suffix):
            text = text[: -len(suffix)]
    return os.path.abspath(text)


def check_prefix(prefix: str) -> IndexSummary:
    """The index of a well-formed dataset at `prefix`, or a one-line M2DError saying what is wrong."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    missing = [path.name for path in (idx, bin_) if not path.is_file()]
    if missing:
        raise M2DError(f"data prefix {prefix}: {' and '.join(missing)} not found (a prefix names a .bin/.idx pair, "
                       "without the suffix; `m2d preprocess` writes them)")
    try:
        idx_bytes, bin_bytes = idx.stat().st_size, bin_.stat().st_size
        with idx.open("rb") as handle:
            header = handle.read(HEADER_BYTES)
        # mapped, not read: a corpus of 10^8 documents has a 2 GB index, and every rank checks it
        raw = np.memmap(idx, dtype=np.uint8, mode="r") if idx_bytes >= HEADER_BYTES else None
    except OSError as exc:
        raise M2DError(f"cannot read data prefix {prefix}: {exc.strerror or exc}") from None
    return _parse_index(prefix, header, raw, idx_bytes, bin_bytes)


def _parse_index(prefix: str, header: bytes, raw, idx_bytes: int, bin_bytes: int) -> IndexSummary:
    def corrupt(why: str) -> M2DError:
        return M2DError(f"data prefix {prefix}: corrupt or truncated index {prefix}.idx ({why})")

    if len(header) < HEADER_BYTES or header[:9] != MAGIC:
        raise corrupt("not a megatron indexed-dataset index" if len(header) >= 9 else "shorter than its header")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[9:HEADER_BYTES])
    if version != 1:
        raise corrupt(f"version {version}, expected 1")
    if code not in TOKEN_DTYPES:
        raise corrupt(f"dtype code {code} is not an integer token type")
    expected = HEADER_BYTES + 12 * sequences + 8 * documents  # Python ints: no overflow from a garbage count
    if idx_bytes != expected:
        raise corrupt(f"{idx_bytes} bytes where {sequences} sequences and {documents} document boundaries need "
                      f"{expected}")
    if sequences == 0:
        raise M2DError(f"data prefix {prefix} holds no documents")
    lengths = raw[HEADER_BYTES:HEADER_BYTES + 4 * sequences].view(np.int32)
    offsets = raw[HEADER_BYTES + 4 * sequences:HEADER_BYTES + 12 * sequences].view(np.int64)
    boundaries = raw[HEADER_BYTES + 12 * sequences:expected].view(np.int64)
    itemsize = np.dtype(TOKEN_DTYPES[code]).itemsize
    end = 0  # byte offset where the next document must start
    for begin in range(0, sequences, CHUNK):  # bounded memory: a few arrays of CHUNK entries at a time
        chunk = lengths[begin:begin + CHUNK].astype(np.int64)
        if chunk.min() < 0:
            raise corrupt("a negative document length")
        starts = end + np.concatenate(([0], np.cumsum(chunk[:-1]))) * itemsize
        if not np.array_equal(offsets[begin:begin + CHUNK], starts):
            raise corrupt("document offsets do not follow the document lengths")
        end = int(starts[-1] + chunk[-1] * itemsize)
    if end != bin_bytes:
        raise M2DError(f"data prefix {prefix}: {prefix}.bin has {bin_bytes} bytes where its index needs {end} "
                       "(truncated, or not the .bin of this .idx)")
    if end == 0:
        raise M2DError(f"data prefix {prefix} holds no tokens")
    if documents < 1 or boundaries[0] != 0 or boundaries[-1] != sequences:
        raise corrupt("document boundaries out of order")
    for begin in range(0, documents, CHUNK):
        if np.any(np.diff(boundaries[max(begin - 1, 0):begin + CHUNK]) < 0):
            raise corrupt("document boundaries out of order")
    return IndexSummary(prefix, TOKEN_DTYPES[code], lengths)
