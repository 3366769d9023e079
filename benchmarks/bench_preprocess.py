"""Preprocessing throughput: `m2d preprocess` vs the plain transformers way, in the same run.

The plain way is what Megatron-LM's tools/preprocess_data.py does per document: the tokenizer's __call__ on one
document at a time, its ids plus the end-of-document token written through megatron-core's IndexedDatasetBuilder,
in one process. Ours batches documents into ~1 MB tasks for the tokenizer's Rust encoder (without building a
BatchEncoding), in 1 or N worker processes. Variants run interleaved, `--rounds` times each; the table gives each
variant's best round (least disturbed by other work on a shared machine) and its ratio to the plain way. All
variants write byte-identical datasets (checked).

Corpora: the fixture's training text as shipped (3 plays, one .txt document each), and the same plays as .jsonl,
one record per paragraph, repeated --repeat times (many documents: what the workers parallelise).

    python benchmarks/bench_preprocess.py [--tokenizer DIR] [--workers N] [--repeat 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "megatron_m2d" / "assets"


def plain(files: list[Path], tokenizer, prefix: Path) -> None:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_m2d.data.tokenize import Task, task_documents

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(len(tokenizer)))
    for file in files:
        lines = [file.read_bytes()] if file.suffix == ".txt" else file.read_bytes().splitlines(keepends=True)
        for text in task_documents(Task(str(file), 1, tuple(lines)), "text"):
            if text.strip():
                ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")


def corpora(root: Path, repeat: int) -> dict[str, list[Path]]:
    from megatron_m2d.testing.corpus import FIXTURE_TRAIN, paragraph_jsonl

    return {"fixture-train (3 .txt)": sorted(FIXTURE_TRAIN.glob("*.txt")),
            f"paragraphs x{repeat} (.jsonl)": [paragraph_jsonl(root / "paragraphs.jsonl", repeat=repeat)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(ASSETS / "fixture-dense"),
                        help="HF tokenizer directory (default: the fixture student's)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="worker processes of the parallel variant (default: the CPUs available)")
    parser.add_argument("--repeat", type=int, default=8, help="copies of the paragraph corpus (default: 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant (default: 3)")
    args = parser.parse_args()

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imported before timing: ~10 s, once)

    from megatron_m2d.distillation.megatron.preprocess import preprocess
    from megatron_m2d.io.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    variants = {"plain (per-document __call__, 1 process)": None, "m2d preprocess --workers 1": 1,
                f"m2d preprocess --workers {args.workers}": args.workers}
    print(f"{'corpus':<28} {'variant':<42} {'MB':>6} {'tokens':>10} {'s':>7} {'tokens/s':>11} {'vs plain':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for index, (corpus, files) in enumerate(corpora(Path(tmp), args.repeat).items()):
            megabytes = sum(f.stat().st_size for f in files) / 1e6
            best = {name: float("inf") for name in variants}
            outputs = {}
            for round_ in range(args.rounds):
                for number, (name, workers) in enumerate(variants.items()):
                    prefix = Path(tmp) / f"c{index}-v{number}-{round_}"
                    start = time.perf_counter()
                    if workers is None:
                        plain(files, tokenizer, prefix)
                    else:
                        preprocess(files, prefix, args.tokenizer, workers=workers, progress=False)
                    best[name] = min(best[name], time.perf_counter() - start)
                    outputs[name] = [Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx")]
            assert len({tuple(o) for o in outputs.values()}) == 1, "variants wrote different datasets"
            tokens = len(outputs[name][0]) // (2 if len(tokenizer) < 65500 else 4)
            for name in variants:
                print(f"{corpus:<28} {name:<42} {megabytes:>6.2f} {tokens:>10} {best[name]:>7.2f} "
                      f"{tokens / best[name]:>11,.0f} {best[next(iter(variants))] / best[name]:>7.2f}x")


if __name__ == "__main__":
    main()
