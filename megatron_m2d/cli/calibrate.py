"""`m2d calibrate` and `m2d inspect`: routing statistics of a HF MoE, and their summary."""

from __future__ import annotations

import json

from megatron_m2d.calibration.inspect import PER_EXPERT
from megatron_m2d.cli.common import calibration_flags


def register(commands) -> None:
    p = commands.add_parser("calibrate", help="record routing statistics of a HF MoE over calibration text")
    p.add_argument("--model", required=True, help="HF MoE checkpoint directory (safetensors)")
    calibration_flags(p, data_required=True)
    p.add_argument("--seed", type=int, default=0, help="shuffles the documents before they are packed")
    p.add_argument("--out", required=True, help="statistics directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_calibrate)

    p = commands.add_parser("inspect", help="per-layer summary of statistics, and a heatmap of expert scores")
    p.add_argument("stats", help="statistics directory written by `m2d calibrate`")
    p.add_argument("--plot", help="write a PNG heatmap of --score (layers x experts) here (default: no plot)")
    p.add_argument("--score", default="selection_freq",
                   choices=PER_EXPERT,
                   help="per-expert quantity the heatmap shows")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run_inspect)


def run_calibrate(args) -> None:
    from megatron_m2d.calibration.run import calibrate

    calibrate(args.model, args.data, args.out, tokens=args.tokens, seq_len=args.seq_len,
              batch_size=args.batch_size, gram=args.gram, device=args.device, dtype=args.dtype,
              seed=args.seed, overwrite=args.overwrite)


def run_inspect(args) -> None:
    from megatron_m2d.calibration.inspect import format_table, inspect_stats

    rows = inspect_stats(args.stats, args.plot, args.score)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    if args.plot:
        print(f"heatmap of {args.score} -> {args.plot}")
