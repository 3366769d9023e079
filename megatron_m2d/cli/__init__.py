"""The `m2d` command line. Each subcommand is a thin shell over the Python API of its stage.

One module per pipeline stage registers its subcommands (`register(commands)`): the parser of each, and the
function that runs it (`set_defaults(handler=...)`). Adding a command means adding a module to COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megatron_m2d import __version__
from megatron_m2d.cli.common import Parser, quiet_libraries
from megatron_m2d.errors import M2DError

# in the order `m2d --help` lists them: the pipeline, then the tools around it
COMMAND_MODULES = ("calibrate", "densify", "baselines", "evaluate", "preprocess", "distill", "plan", "convert", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="m2d", description="Turn a HF Mixture-of-Experts LM into a dense LM.")
    parser.add_argument("--version", action="version", version=f"megatron_m2d {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"megatron_m2d.cli.{name}").register(commands)
    return parser


def run(args: argparse.Namespace) -> None:
    args.handler(args)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except M2DError as exc:
        print(f"m2d: error: {exc}", file=sys.stderr)
        return 2
    return 0
