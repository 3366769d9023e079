"""`m2d preprocess`: tokenize text into megatron-core indexed datasets (.bin/.idx) for `m2d distill --backend
megatron` (needs megatron-core)."""

from __future__ import annotations

import os

from megatron_m2d.cli.convert import require_megatron_core


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def register(commands) -> None:
    p = commands.add_parser(
        "preprocess", help="tokenize .txt/.jsonl text into a Megatron indexed dataset (PREFIX.bin/.idx)",
        description="Tokenize every document (a .txt file, or a .jsonl record) with the student's tokenizer, end "
                    "each with the end-of-document token, and write a megatron-core indexed dataset: PREFIX.bin, "
                    "PREFIX.idx and the summary PREFIX.m2d.json. The output does not depend on --workers.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt/.jsonl files or directories (searched recursively, files in sorted order)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="the student's HF directory (tokenizer.json, or a sentencepiece tokenizer.model)")
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.m2d.json (the prefix --data takes)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="tokenizer processes (default: the CPUs available, here %(default)s)")
    p.add_argument("--field", default="text", help="JSON field holding a .jsonl record's text (default: %(default)s)")
    p.add_argument("--add-bos", action="store_true",
                   help="also start every document with the tokenizer's bos token (default: off, as the HF "
                        "backend packs its data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one bar on stderr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at PREFIX (default: refuse)")
    p.set_defaults(handler=run_preprocess)


def run_preprocess(args) -> None:
    require_megatron_core()
    from megatron_m2d.distillation.megatron.preprocess import preprocess

    summary = preprocess(args.input, args.out, args.tokenizer, workers=args.workers, field=args.field,
                         add_bos=args.add_bos, overwrite=args.overwrite, progress=not args.no_progress)
    rate = summary["tokens"] / max(summary["seconds"], 1e-9)
    print(f"preprocess: {summary['documents']} documents, {summary['tokens']} tokens ({summary['dtype']}) -> "
          f"{args.out}.bin/.idx in {summary['seconds']:.1f} s ({rate:,.0f} tokens/s)")
