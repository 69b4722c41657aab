"""The README's commands, for the tests that run them as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"


def bash_block(heading: str, readme: Path = README) -> list[tuple[str, ...]]:
    """Command lines of the first ```bash block under `## heading`, each as shell tokens
    (backslash continuations joined, comments dropped)."""
    text = readme.read_text(encoding="utf-8")
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f"README.md has no '## {heading}' section"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, f"README.md's '## {heading}' section has no ```bash block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        tokens = tuple(shlex.split(line, comments=True))
        if tokens:
            commands.append(tokens)
    return commands


def find_readme_command(heading: str, starts_with: tuple[str, ...], contains: str) -> list[str]:
    """The one command of the block that starts with `starts_with` and has `contains` among
    its tokens (failing if the README no longer has exactly one)."""
    found = [
        list(c)
        for c in bash_block(heading)
        if c[: len(starts_with)] == starts_with and contains in c
    ]
    assert len(found) == 1, f"README '## {heading}': {len(found)} commands {starts_with} {contains}"
    return found[0]
