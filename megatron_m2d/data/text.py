"""Text sources behind one function: local .txt / .jsonl files or directories, or a HF datasets name.

Calibration wants fixed-length token blocks: documents are shuffled with the seed, joined with the tokenizer's
end-of-text token and cut into `seq_len` blocks (the usual packing of LM calibration and training data).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

import torch

from megatron_m2d.errors import M2DError

TEXT_SUFFIXES = (".txt", ".jsonl")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise M2DError(f"unsupported data file {path}: use .txt or .jsonl (field 'text')")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise M2DError(f"no .txt or .jsonl files under {path}")
    return files


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise M2DError(f"{path}:{number}: not valid JSON") from None
            if not isinstance(record, dict) or field not in record:
                raise M2DError(f"{path}:{number}: no field {field!r}")
            yield str(record[field])


def read_documents(source: str, field: str = "text", split: str = "train") -> list[str]:
    """Every document of `source`: a local file or directory, else a HF datasets name (needs network)."""
    path = Path(source)
    if path.exists():
        documents: list[str] = []
        for file in _files(path):
            if file.suffix == ".jsonl":
                documents.extend(_read_jsonl(file, field))
            else:
                documents.append(file.read_text(encoding="utf-8", errors="replace"))
    else:
        documents = _hf_dataset(source, field, split)
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise M2DError(f"calibration data {source} is empty")
    return documents


def _hf_dataset(name: str, field: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise M2DError(f"{name} is not a local file or directory, and the `datasets` package for hub "
                       "datasets is not installed (pip install 'megatron_m2d[eval]')") from None
    config = None
    if ":" in name:  # "wikitext:wikitext-2-raw-v1"
        name, config = name.split(":", 1)
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub raises many types; the user needs one line
        raise M2DError(f"cannot load dataset {name!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    return [str(row[field]) for row in dataset]


def token_blocks(tokenizer, source: str, tokens: int, seq_len: int, seed: int = 0,
                 field: str = "text") -> torch.Tensor:
    """[N, seq_len] int64 blocks holding up to `tokens` tokens of `source` (fewer if the source is short)."""
    if tokens < 1 or seq_len < 2:
        raise M2DError("need --tokens >= 1 and --seq-len >= 2")
    documents = read_documents(source, field)
    random.Random(seed).shuffle(documents)
    separator = tokenizer.eos_token_id
    wanted_blocks = max(1, -(-tokens // seq_len))
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
        if len(stream) >= wanted_blocks * seq_len:
            break
    blocks = min(wanted_blocks, len(stream) // seq_len)
    if blocks == 0:
        raise M2DError(f"calibration data {source} has {len(stream)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
