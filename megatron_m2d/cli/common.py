"""Flags and helpers more than one subcommand shares."""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.HelpFormatter):
    """`--help` states every option's default: '(default: X)' is appended unless the help text already says
    what happens by default (an option whose default is computed, like --select's k, must say so in words;
    tests/test_cli_help.py holds every subcommand to this)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or not action.option_strings or action.required:
            return text
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or isinstance(action, argparse._StoreConstAction):  # `is`: a default of 0 is still shown
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser of `m2d` and of every subcommand (add_subparsers passes its class on): defaults in --help,
    and usage errors as one line like every other m2d error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        from megatron_m2d.errors import M2DError

        raise M2DError(f"{self.prog.removeprefix('m2d ')}: {message} (see `{self.prog} --help`)")


def calibration_flags(parser: argparse.ArgumentParser, data_required: bool, gram: bool = True,
                      data_help: str = "calibration text: a local .txt/.jsonl file or directory, a named source "
                                       "(fixture, wikitext2, ...) or a HF datasets name ('name:config')") -> None:
    """The flags of a streamed calibration pass. `gram=False` for commands that run no experts (d2d)."""
    parser.add_argument("--data", required=data_required, help=data_help)
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    if gram:
        parser.add_argument("--gram", action="store_true",
                            help="also run every expert on every token for the all-token Gram (costs E/top-k x)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")


def quiet_libraries() -> None:
    """Our steps show one progress display each; the libraries' own bars inside them (transformers' "Loading
    weights" and "Writing model shards", huggingface_hub's and datasets' downloads) are silenced, unless the user
    set these variables."""
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(variable, "1")
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["transformers"].utils.logging.disable_progress_bar()  # read the variable at its own import


def is_main_process() -> bool:
    """Under torchrun only rank 0 reports results (every rank runs the same command)."""
    return int(os.environ.get("RANK", "0")) == 0


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
