"""The `m2d` command line. Each subcommand is a thin shell over the Python API of its stage.

One module per pipeline stage registers its subcommands (`register(commands)`): the parser of each, and the
function that runs it (`set_defaults(handler=...)`). Adding a command means adding a module to COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megatron_m2d import __version__
from megatron_m2d.cli.common import Parser, quiet_libraries
from megatron_m2d.errors import M2DError
from megatron_m2d.validation import validate

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
    validate(args)
    args.handler(args)


def _fail(message: str, code: int) -> int:
    print("m2d: error: " + " ".join(str(message).split()), file=sys.stderr)  # one line, always
    return code


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; 2 and one line on bad input or a failing environment (an OSError names the file);
    1 and one line on anything unforeseen (M2D_TRACEBACK=1 shows where), 130 on Ctrl-C."""
    quiet_libraries()
    try:
        run(build_parser().parse_args(argv))
    except M2DError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 -- users get one line; developers ask for the traceback
        if os.environ.get("M2D_TRACEBACK"):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(f"unexpected {type(exc).__name__}: {text} (a bug in m2d: please report it with the command; "
                     "M2D_TRACEBACK=1 prints where it happened)", 1)
    return 0
