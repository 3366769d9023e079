"""Tokenizing a corpus for pretraining: .txt/.jsonl inputs streamed as bounded tasks, each encoded into token ids
with an end-of-document token. The worker side of `m2d preprocess`; no Megatron import here.

A document is one .txt file or one JSON Lines record (field `text` by default), as in `text.read_documents`.
Tasks hold raw bytes (about TASK_BYTES each), so reading stays bounded in memory and the JSON parsing, UTF-8
decoding and tokenization all happen in the workers. Results are consumed in task order, so the output does not
depend on the number of workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_m2d.data.text import jsonl_text, text_files
from megatron_m2d.errors import M2DError

# Big enough that the per-task costs (inter-process transfer, one batched tokenizer call) are negligible,
# small enough that a few tasks in flight per worker stay a few MB.
TASK_BYTES = 1 << 20
# A document is tokenized whole (splitting it would change the ids at the cuts), and a fast tokenizer holds about
# 100 bytes per token while it works: 64 MiB of text is ~1.6 GB per worker. Larger documents are refused.
MAX_DOCUMENT_BYTES = 64 << 20


@dataclass(frozen=True)
class Task:
    """Raw text of consecutive documents of one file: the whole file for .txt, lines for .jsonl."""
    path: str
    first_line: int
    chunks: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


@dataclass(frozen=True)
class Encoded:
    """Token ids of a task's documents, concatenated (each with its end-of-document token), and their lengths."""
    tokens: np.ndarray  # int64
    lengths: np.ndarray  # int64, one per non-empty document
    empty: int  # documents skipped because they hold only whitespace


def input_files(inputs: list[str | Path]) -> list[Path]:
    """Every .txt/.jsonl file the inputs name, inputs in the order given, each directory's files sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise M2DError(f"input not found: {path}")
        files.extend(text_files(path))
    seen: set[Path] = set()
    for file in files:
        if file.resolve() in seen:
            raise M2DError(f"{file} is named twice by the inputs (a file and a directory holding it?)")
        seen.add(file.resolve())
    return files


def read_tasks(files: list[Path]) -> Iterator[Task]:
    for file in files:
        if file.suffix == ".txt":
            _check_size(file.stat().st_size, f"{file} (a .txt file is one document)")
            yield Task(str(file), 1, (file.read_bytes(),))
            continue
        lines: list[bytes] = []
        size, first = 0, 1
        with file.open("rb") as handle:
            # readline with a limit: a file of one endless line must not be read whole before it is refused
            for number, line in enumerate(iter(lambda: handle.readline(MAX_DOCUMENT_BYTES + 1), b""), start=1):
                _check_size(len(line), f"{file}:{number}")
                lines.append(line)
                size += len(line)
                if size >= TASK_BYTES:
                    yield Task(str(file), first, tuple(lines))
                    lines, size, first = [], 0, number + 1
        if lines:
            yield Task(str(file), first, tuple(lines))


def _check_size(size: int, where: str) -> None:
    if size > MAX_DOCUMENT_BYTES:
        raise M2DError(f"{where}: a document of {size / 2**20:.1f} MiB, more than the {MAX_DOCUMENT_BYTES >> 20} MiB "
                       "tokenized at once: split it into smaller documents (.jsonl, one per line)")


def task_documents(task: Task, field: str) -> list[str]:
    """The task's documents as text, in order (empty ones included, as "")."""
    if task.path.endswith(".txt"):
        return [task.chunks[0].decode("utf-8", errors="replace")]
    documents = []
    for offset, line in enumerate(task.chunks):
        text = jsonl_text(line.decode("utf-8", errors="replace"), field, f"{task.path}:{task.first_line + offset}")
        if text is not None:
            documents.append(text)
    return documents


class DocumentEncoder:
    """Token ids of documents: no special tokens from the tokenizer itself (as the HF backend packs its data),
    the end-of-document token `eod` after each, `bos` before each when given."""

    def __init__(self, tokenizer, eod: int, bos: int | None = None, field: str = "text"):
        self.tokenizer, self.eod, self.bos, self.field = tokenizer, eod, bos, field
        # documents longer than the model's context are expected here: silence transformers' warning about them
        self.tokenizer.model_max_length = int(1e30)
        # A fast tokenizer's __call__ is its Rust encoder plus a BatchEncoding we do not need (half the time):
        # call the encoder as __call__ configures it (no truncation or padding, special tokens in the text
        # matched unless the tokenizer splits them).
        self.backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if self.backend is not None:
            self.backend.no_truncation()
            self.backend.no_padding()
            self.backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def __call__(self, task: Task) -> Encoded:
        documents = task_documents(task, self.field)
        texts = [_well_formed(text) for text in documents if text.strip()]
        ids = self._ids(texts) if texts else []
        head = [] if self.bos is None else [self.bos]
        pieces = [np.asarray(head + row + [self.eod], dtype=np.int64) for row in ids]
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        lengths = np.asarray([len(piece) for piece in pieces], dtype=np.int64)
        return Encoded(tokens, lengths, len(documents) - len(texts))


    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # tokenizers < 0.20: no _fast
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


def _well_formed(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer encodes: each becomes U+FFFD, as undecodable
    bytes do (a round trip through UTF-16 pairs what pairs and replaces the rest)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", errors="surrogatepass").decode("utf-16", errors="replace")


_worker_encoder: DocumentEncoder | None = None


def start_worker(encoder: DocumentEncoder) -> None:
    """Initializer of a worker process. The tokenizer arrives pickled by the parent (our own object, never user
    bytes), so a sentencepiece model is converted once, not once per worker. Its own thread pool stays off: the
    parallelism is the worker processes."""
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = encoder


def encode_in_worker(task: Task) -> Encoded:
    return _worker_encoder(task)
