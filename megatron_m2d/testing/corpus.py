"""Corpora for tests and examples of the Megatron data path, from the bundled plays.

`m2d preprocess` takes a .txt file as one document, so the fixture's training text is 3 documents and any split
of it leaves a share empty. As .jsonl with one record per paragraph it is ~3,600 documents of the same text.
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURE_TRAIN = Path(__file__).resolve().parent.parent / "assets" / "fixture-train"


def paragraph_jsonl(out: str | Path, source: str | Path = FIXTURE_TRAIN, repeat: int = 1) -> Path:
    """Write `out` (.jsonl): every blank-line-separated paragraph of the .txt files under `source`, in sorted file
    order, `repeat` times over."""
    files = sorted(Path(source).glob("*.txt")) if Path(source).is_dir() else [Path(source)]
    paragraphs = [p for file in files for p in file.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    out = Path(out)
    out.write_text("".join(json.dumps({"text": p}) + "\n" for _ in range(repeat) for p in paragraphs))
    return out
