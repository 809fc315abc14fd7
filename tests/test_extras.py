"""A part whose extra is missing says, in one line, which extra to install.

The import is run in a subprocess where a finder in front of the others reports the package as
not installed. (torchmetrics itself imports transformers and matplotlib when their metadata
says they are installed, so the base install is checked for real in CI, in a fresh virtual
environment without the extras.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_BLOCK = """
import sys


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {package!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


@pytest.mark.parametrize(
    ("module", "package", "extra"), [("mllm_metrics.lightning", "lightning", "lightning")]
)
def test_a_part_without_its_extra_names_the_extra(module, package, extra):
    program = _BLOCK.format(package=package) + f"\nimport {module}\n"
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ModuleNotFoundError: ")
    assert f'pip install "mllm-metrics[{extra}]"' in last_line
