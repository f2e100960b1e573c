"""The README opens with the two newcomer commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re

from tests.conftest import REPO


def opening_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_opens_with_exactly_two_one_line_commands() -> None:
    text = (REPO / "README.md").read_text()
    head = re.match(r"# [^\n]+\n\n```bash\n[^\n]+\n```\n\n```bash\n[^\n]+\n```\n\n[^`]", text)
    assert head is not None, "the title, then two one-line bash blocks, then prose"
    commands = opening_commands()
    assert "cxr-node serve --config config/node.toml" in commands[0]
    assert "pip install ." in commands[0] and "[train" not in commands[0]  # the node installs without torch
    assert "pytest" in commands[1] and "ruff" in commands[1] and "mypy" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    assert opening_commands()[1] in (REPO / ".ci" / "run").read_text()
