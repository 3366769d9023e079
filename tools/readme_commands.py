"""Print the README's set-up commands, one per line: the install+demo command, then the test command.

`.ci/run` runs exactly these in a fresh virtual environment, so what CI proves is what the README says. The
commands are the lines of the first fenced block under '## Set up', each without its trailing '# comment'.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def setup_commands(readme: str | Path) -> list[str]:
    text = Path(readme).read_text()
    section = text.split("\n## Set up", 1)
    if len(section) != 2:
        raise SystemExit(f"{readme}: no '## Set up' section")
    block = re.search(r"```[a-z]*\n(.*?)```", section[1], re.S)
    if block is None:
        raise SystemExit(f"{readme}: no code block under '## Set up'")
    # a '#' opens a comment only after whitespace (shell rules), so `-e ".[dev]"` and URLs survive
    lines = (re.split(r"\s+#", line, maxsplit=1)[0].strip() for line in block.group(1).splitlines())
    return [line for line in lines if line]


if __name__ == "__main__":
    print("\n".join(setup_commands(sys.argv[1] if len(sys.argv) > 1 else "README.md")))
