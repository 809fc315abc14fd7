"""The README's Python examples run as written and print what the README shows under them.

Runnable examples are ```python blocks whose first line names what they need
(``# pip install mllm-metrics`` or ``# pip install "mllm-metrics[EXTRA]"``); the ```text block that
follows holds their output. ```py blocks are fragments to read, not run. CI also runs each
example in a fresh virtual environment that has only its extra installed (``-k EXTRA``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = re.compile(
    r"```python\n# pip install (\S+)[^\n]*\n(.*?)```\n\n```text\n(.*?)```", re.DOTALL
)
EXAMPLES = EXAMPLE.findall(README.read_text())


def _extra(requirement: str) -> str:
    match = re.search(r"\[(\w+)\]", requirement)
    return match.group(1) if match else "base"


def test_every_python_block_is_a_runnable_example_with_its_output():
    assert len(EXAMPLES) == README.read_text().count("```python\n") >= 3


@pytest.mark.parametrize(
    ("code", "output"),
    [(code, output) for _, code, output in EXAMPLES],
    ids=[_extra(requirement) for requirement, _, _ in EXAMPLES],
)
def test_readme_example_prints_what_the_readme_shows(code, output, capsys):
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out == output
