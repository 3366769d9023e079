"""Text sources behind one function: local .txt / .jsonl files or directories, named sources, HF datasets.

Calibration wants fixed-length token blocks: documents are shuffled with the seed, joined with the tokenizer's
end-of-text token and cut into `seq_len` blocks (the usual packing of LM calibration and training data).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterator

import torch

from megatron_m2d.errors import M2DError

TEXT_SUFFIXES = (".txt", ".jsonl")


def text_files(path: Path) -> list[Path]:
    """`path` itself when it is a .txt/.jsonl file, else every .txt/.jsonl file under it, in sorted order."""
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise M2DError(f"unsupported data file {path}: use .txt or .jsonl (field 'text')")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise M2DError(f"no .txt or .jsonl files under {path}")
    return files


def jsonl_text(line: str, field: str, where: str) -> str | None:
    """The `field` of one JSON Lines record (None for a blank line); `where` ("file:line") names it in errors."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise M2DError(f"{where}: not valid JSON") from None
    if not isinstance(record, dict) or field not in record:
        raise M2DError(f"{where}: no field {field!r}")
    text = record[field]
    if text is None:  # a record without text is an empty document
        return None
    if not isinstance(text, str):
        raise M2DError(f"{where}: field {field!r} holds a {type(text).__name__}, not text")
    return text


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            text = jsonl_text(line, field, f"{path}:{number}")
            if text is not None:
                yield text


ASSETS = Path(__file__).resolve().parent.parent / "assets"

# Named sources. Roles are calibration, train and eval; named sources keep them apart, so calibration, training
# and evaluation text never overlap. Each value: role -> (local path or HF dataset "name:config", HF split).
NAMED_SOURCES = {
    # the fixture's own split: Macbeth calibrates, Julius Caesar evaluates (neither was in the fixture's training
    # text); three plays it was trained on are the distillation text
    "fixture": {"calibration": (str(ASSETS / "macbeth.txt"), None), "eval": (str(ASSETS / "julius_caesar.txt"), None),
                "train": (str(ASSETS / "fixture-train"), None)},
    "wikitext2": {role: ("wikitext:wikitext-2-raw-v1", split) for role, split in
                  (("train", "train"), ("calibration", "validation"), ("eval", "test"))},
    "wikitext103": {role: ("wikitext:wikitext-103-raw-v1", split) for role, split in
                    (("train", "train"), ("calibration", "validation"), ("eval", "test"))},
    # FineWeb-Edu has one split: documents are dealt to roles by a stable hash of their text (5 % eval,
    # 5 % calibration, 90 % train)
    "fineweb-edu": {role: ("HuggingFaceFW/fineweb-edu:sample-10BT", "train") for role in ("train", "calibration", "eval")},
}
ROLES = ("train", "calibration", "eval")


def resolve(source: str, role: str) -> tuple[str, str | None]:
    """(local path or dataset name, HF split) that `source` means for `role`."""
    if role not in ROLES:
        raise ValueError(role)
    if source in NAMED_SOURCES:
        if role not in NAMED_SOURCES[source]:
            raise M2DError(f"source {source!r} has no {role} split (it has: {', '.join(NAMED_SOURCES[source])})")
        return NAMED_SOURCES[source][role]
    return source, None


def _hash_role(text: str) -> str:
    bucket = int(hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()[:8], 16) % 100
    return "eval" if bucket < 5 else "calibration" if bucket < 10 else "train"


def read_documents(source: str, field: str = "text", role: str = "calibration") -> list[str]:
    """Every document of `source` for `role`: a local .txt/.jsonl file or directory (used as given), a named
    source (NAMED_SOURCES, with its own split per role) or a HF datasets name 'name[:config]' (needs network)."""
    location, split = resolve(source, role)
    documents = _read(location, field, split)
    if source == "fineweb-edu":
        documents = [d for d in documents if _hash_role(d) == role]
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise M2DError(f"{role} data {source} is empty")
    return documents


def _read(source: str, field: str, split: str | None) -> list[str]:
    path = Path(source)
    if path.exists():
        documents: list[str] = []
        for file in text_files(path):
            if file.suffix == ".jsonl":
                documents.extend(_read_jsonl(file, field))
            else:
                documents.append(file.read_text(encoding="utf-8", errors="replace"))
        return documents
    return _hf_dataset(source, field, split or "train")


def _hf_dataset(name: str, field: str, split: str) -> list[str]:
    """WikiText stores one line per row: rows are joined into one document (the usual perplexity setup)."""
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
    rows = [str(row[field]) for row in dataset]
    return ["".join(rows)] if name == "wikitext" else rows


def token_stream(tokenizer, source: str, max_tokens: int, seed: int | None = None, field: str = "text",
                 role: str = "calibration") -> torch.Tensor:
    """Up to `max_tokens` tokens of `source`'s `role` documents joined by the end-of-text token: in document
    order, or shuffled by `seed` when given."""
    documents = read_documents(source, field, role)
    if seed is not None:
        random.Random(seed).shuffle(documents)
    separator = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
        if len(stream) >= max_tokens:
            break
    return torch.tensor(stream[:max_tokens], dtype=torch.long)


def token_blocks(tokenizer, source: str, tokens: int, seq_len: int, seed: int = 0,
                 field: str = "text", role: str = "calibration") -> torch.Tensor:
    """[N, seq_len] int64 blocks holding up to `tokens` tokens of `source` (fewer if the source is short),
    documents shuffled by `seed`."""
    if tokens < 1 or seq_len < 2:
        raise M2DError("need --tokens >= 1 and --seq-len >= 2")
    wanted_blocks = max(1, -(-tokens // seq_len))
    stream = token_stream(tokenizer, source, wanted_blocks * seq_len, seed, field, role)
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise M2DError(f"{role} data {source} has {len(stream)} tokens, fewer than one block of {seq_len}")
    return stream[: blocks * seq_len].view(blocks, seq_len)
