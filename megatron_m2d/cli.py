"""The `m2d` command line. Each subcommand is a thin shell over the Python API of its stage."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_m2d import __version__
from megatron_m2d.densification.grouping import GROUPINGS
from megatron_m2d.densification.merge import MERGES, SCALINGS
from megatron_m2d.densification.scoring import SCORINGS, KernelOptions
from megatron_m2d.errors import M2DError


def _calibration_flags(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument("--data", required=data_required,
                        help="local .txt/.jsonl file or directory, or a HF datasets name ('name:config')")
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens (default 65536)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--gram", action="store_true",
                        help="also run every expert on every token for the all-token Gram (costs E/top-k x)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2d", description="Turn a HF Mixture-of-Experts LM into a dense LM.")
    parser.add_argument("--version", action="version", version=f"megatron_m2d {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("calibrate", help="record routing statistics of a HF MoE over calibration text")
    p.add_argument("--model", required=True, help="HF MoE checkpoint directory (safetensors)")
    _calibration_flags(p, data_required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="statistics directory to write")
    p.add_argument("--overwrite", action="store_true")

    p = commands.add_parser("densify", help="score, select, group, merge and export a dense HF checkpoint")
    p.add_argument("--model", required=True, help="HF MoE checkpoint directory (safetensors)")
    p.add_argument("--stats", help="statistics from `m2d calibrate` (omit to calibrate first on --data)")
    p.add_argument("--scoring", required=True, choices=list(SCORINGS))
    p.add_argument("--select", type=int, help="K experts kept per layer (default: k)")
    p.add_argument("--groups", type=int, help="k groups = dense width in experts (default: the model's top-k)")
    p.add_argument("--grouping", default="round_robin", choices=list(GROUPINGS))
    p.add_argument("--scaling", default="uniform", choices=list(SCALINGS))
    p.add_argument("--merge", default="average", choices=list(MERGES))
    p.add_argument("--merge-alpha", type=float, default=0.5, help="share of the others merged in by --merge partial")
    p.add_argument("--kernel-gram", default="auto", choices=["auto", "all", "gated"],
                   help="D-optimal Gram: all-token (needs calibrate --gram), gate-weighted, or auto (default): "
                        "all-token when the statistics have it")
    p.add_argument("--kernel-activation", default="reap", choices=["reap", "rms"], help="ACP weight of gld_reap")
    p.add_argument("--kernel-lambda", type=float, default=1.0, help="ridge = this x mean(diag K) / k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-gb", type=float, default=1.0,
                   help="largest safetensors shard written; one shard is held in memory while written (default 1)")
    _calibration_flags(p, data_required=False)
    p.add_argument("--out", required=True, help="dense HF checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true")

    p = commands.add_parser("inspect", help="per-layer summary of statistics, and a heatmap of expert scores")
    p.add_argument("stats")
    p.add_argument("--plot", help="write a PNG heatmap here")
    p.add_argument("--score", default="selection_freq", help="per-expert quantity to plot")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = commands.add_parser("demo", help="the whole offline path on the embedded default model (CPU, ~1 min)")
    p.add_argument("--out", default="m2d-demo")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--overwrite", action="store_true")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "calibrate":
        from megatron_m2d.calibration.run import calibrate

        calibrate(args.model, args.data, args.out, tokens=args.tokens, seq_len=args.seq_len,
                  batch_size=args.batch_size, gram=args.gram, device=args.device, dtype=args.dtype,
                  seed=args.seed, overwrite=args.overwrite)
    elif args.command == "densify":
        from megatron_m2d.densification.run import densify

        kernel = KernelOptions(args.kernel_gram, args.kernel_activation, args.kernel_lambda)
        calibration = dict(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, gram=args.gram,
                           device=args.device, dtype=args.dtype, seed=args.seed)
        densify(args.model, args.out, args.scoring, select=args.select, groups=args.groups, stats=args.stats,
                data=args.data, overwrite=args.overwrite, calibration=calibration, grouping=args.grouping,
                scaling=args.scaling, merge=args.merge, merge_alpha=args.merge_alpha, kernel=kernel,
                seed=args.seed, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    elif args.command == "inspect":
        from megatron_m2d.calibration.inspect import format_table, inspect_stats

        rows = inspect_stats(args.stats, args.plot, args.score)
        print(json.dumps(rows, indent=1) if args.json else format_table(rows))
        if args.plot:
            print(f"heatmap of {args.score} -> {args.plot}")
    elif args.command == "demo":
        from megatron_m2d.demo import run_demo

        run_demo(args.out, tokens=args.tokens, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except M2DError as exc:
        print(f"m2d: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
