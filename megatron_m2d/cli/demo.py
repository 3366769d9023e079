"""`m2d demo`: the whole path on the committed fixture MoE."""

from __future__ import annotations


def register(commands) -> None:
    p = commands.add_parser("demo", help="the whole path on the committed fixture MoE (CPU, a few minutes)")
    p.add_argument("--out", default="m2d-demo", help="directory of the students, tables and plots")
    p.add_argument("--quick", action="store_true", help="tiny token counts: checks the path, not the methods")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it exists")
    p.set_defaults(handler=run_demo)


def run_demo(args) -> None:
    from megatron_m2d.demo import run_demo as demo

    demo(args.out, quick=args.quick, overwrite=args.overwrite)
