"""Help that tells the truth, for every subcommand there is and every one added later: each option has help text
and states its default, and the README's synopsis of each command lists every option `--help` lists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from megatron_m2d.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def subcommands(parser: argparse.ArgumentParser, prefix: str = "m2d") -> dict[str, argparse.ArgumentParser]:
    """'m2d calibrate' -> its parser, for every (nested) subcommand."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix} {name}"] = sub
                found.update(subcommands(sub, f"{prefix} {name}"))
    return found


COMMANDS = subcommands(build_parser())


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                                                             argparse._SubParsersAction))]


def test_there_are_commands_to_check():
    assert {"m2d calibrate", "m2d densify", "m2d eval", "m2d distill", "m2d demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_states_its_default(command):
    parser = COMMANDS[command]
    text = parser.format_help()
    one_required = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in options(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help text"
        if not action.option_strings or action.required or action in one_required or action.nargs == 0:
            continue  # positionals and required options have no default; flags default to off
        helped = parser._get_formatter()._get_help_string(action) % {**vars(action), "prog": parser.prog}
        assert "default" in helped.lower() or "required" in helped.lower(), \
            f"{command} {name}: --help does not say what happens by default"
        if action.default is not None and action.default is not False \
                and action.default != argparse.SUPPRESS:  # 0 is a default to show; SUPPRESS: the help says it
            shown = {str(action.default)} | ({f"{action.default:g}"} if isinstance(action.default, float) else set())
            assert any(text in helped for text in shown), f"{command} {name}: default {action.default!r} not shown"
    assert "(default: None)" not in text, command


def readme_invocations() -> dict[str, set[str]]:
    """Options named on each `m2d ...` line of the README's code blocks (continuation lines joined)."""
    named: dict[str, set[str]] = {}
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        joined: list[str] = []
        for line in lines:
            if joined and line.startswith((" ", "\t")) and not line.strip().startswith(("$", "m2d ")):
                joined[-1] += " " + line.strip()
            else:
                joined.append(line.strip())
        for line in joined:
            line = line.removeprefix("$ ")
            if not line.startswith("m2d "):
                continue
            words = line.split()
            for length in (3, 2):  # the longest command the line names: 'm2d convert hf-to-megatron' ...
                command = " ".join(words[:length])
                if command in COMMANDS:
                    named.setdefault(command, set()).update(re.findall(r"--[a-z][a-z0-9-]*", line))
                    named[command].update(f"<{other}>" for other in re.findall(r"every flag of (m2d [a-z-]+)", line))
                    break
    return named  # a synopsis saying "every flag of m2d X" (m2d plan) names '<m2d X>' among its flags


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_readme_synopsis_lists_every_option(command):
    parser = COMMANDS[command]
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        return  # a command group: its subcommands are checked one by one
    invocations = readme_invocations()
    if command not in invocations:  # reported in the summary (-ra) until the command's section is written
        pytest.skip(f"README has no `{command}` synopsis yet")
    referred = {flag[1:-1] for flag in invocations[command] if flag.startswith("<")}
    listed = invocations[command] - {f"<{other}>" for other in referred}
    offered = {a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]
               for a in options(parser) if a.option_strings}
    missing = sorted(offered - listed - set().union(*(invocations.get(other, set()) for other in referred)))
    assert not missing, f"README's `{command}` lines do not mention {missing}"
    unknown = sorted(flag for flag in listed - offered if not any(flag in a.option_strings for a in options(parser)))
    assert not unknown, f"README's `{command}` lines name options `{command} --help` does not offer: {unknown}"
