"""The demo's command line with only the base install: help works, a missing extra is one line.

The frameworks are blocked in a subprocess (``sys.modules[name] = None`` makes ``import name``
fail as if it were not installed), so these tests need neither transformers nor Lightning.
They are blocked after ``import mllm_metrics``: torchmetrics imports transformers and
matplotlib when they are installed (and not at all with the base install).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mllm_metrics

DEMO = Path(mllm_metrics.__file__).resolve().parent / "demo"
EXTRA = 'pip install "mllm-metrics[demo]"'


BLOCK = """
import sys
import mllm_metrics
blocked = {blocked!r}
for name in [*sys.modules, *blocked]:
    if name.split(".")[0] in blocked:
        sys.modules[name] = None
"""


def _python(code: str, *blocked: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the ``blocked`` packages are not importable."""
    package_root = Path(mllm_metrics.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), *sys.path])}
    return subprocess.run(
        [sys.executable, "-c", BLOCK.format(blocked=blocked) + code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


MAIN = "from mllm_metrics.demo.cli import main; sys.exit(main({argv!r}))"
FRAMEWORKS = ("transformers", "lightning")


def test_help_needs_neither_transformers_nor_lightning():
    top = _python(MAIN.format(argv=["--help"]), *FRAMEWORKS)
    assert top.returncode == 0, top.stderr
    assert "mllm-metrics demo" in top.stdout and EXTRA in top.stdout
    demo = _python(MAIN.format(argv=["demo", "--help"]), *FRAMEWORKS)
    assert demo.returncode == 0, demo.stderr
    assert "--max-steps" in demo.stdout and "--backend" in demo.stdout
    assert "--generate-max-new-tokens" in demo.stdout
    assert "Traceback" not in top.stderr + demo.stderr


def test_python_dash_m_help_needs_neither_transformers_nor_lightning():
    code = (
        "import runpy; sys.argv = ['mllm_metrics.demo', '--help']; "
        "runpy.run_module('mllm_metrics.demo', run_name='__main__')"
    )
    result = _python(code, *FRAMEWORKS)
    assert result.returncode == 0, result.stderr
    assert "--devices" in result.stdout


def test_help_imports_no_framework():
    # Installed or not, `--help` imports nothing that `import mllm_metrics` did not.
    code = (
        "before = set(sys.modules)\n"
        "from mllm_metrics.demo.cli import main\n"
        "try:\n    main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('transformers', 'lightning', 'matplotlib', 'tokenizers', 'accelerate')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_demo_without_its_extra_is_a_one_line_error(tmp_path):
    argv = ["demo", "--out", str(tmp_path / "out"), "--max-steps", "2"]
    result = _python(MAIN.format(argv=argv), *FRAMEWORKS)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert EXTRA in lines[0] and "lightning" in lines[0] and "transformers" in lines[0]
    assert not (tmp_path / "out").exists()


def test_hf_backend_names_what_it_misses():
    argv = ["demo", "--backend", "hf", "--max-steps", "2"]
    result = _python(MAIN.format(argv=argv), "accelerate")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "accelerate" in result.stderr and EXTRA in result.stderr
    assert "lightning" not in result.stderr  # the hf back-end does not need it


def _imports(path: Path) -> set[str]:
    """The ``mllm_metrics.demo`` modules that ``path`` imports, at any depth in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(
            name.removeprefix("mllm_metrics.demo.").split(".")[0]
            for name in names
            if name.startswith("mllm_metrics.demo.")
        )
    return found


def test_demo_modules_import_each_other_one_way():
    modules = {path.stem for path in DEMO.glob("*.py")} - {"__init__", "__main__"}
    graph = {name: _imports(DEMO / f"{name}.py") & modules - {name} for name in modules}
    # Depth-first search for a cycle, e.g. cli -> lightning_backend -> cli.
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            assert state.get(other) != 1, " -> ".join([*path, name, other])
            if other not in state:
                visit(other, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    for backend in ("lightning_backend", "hf_backend"):
        assert {"cli", "runner"}.isdisjoint(graph[backend]), graph[backend]


def test_generation_option_and_its_default():
    from mllm_metrics.demo.cli import DemoConfig, _parser

    parse = _parser("mllm-metrics demo").parse_args
    assert parse([]).generate_max_new_tokens is None  # auto: bits + 4
    assert parse(["--generate-max-new-tokens", "auto"]).generate_max_new_tokens is None
    assert parse(["--generate-max-new-tokens", "0"]).generate_max_new_tokens == 0
    assert parse(["--generate-max-new-tokens", "12"]).generate_max_new_tokens == 12
    # The answer (bits and </s>) fits, with room for extra tokens; 0 turns generation off.
    assert DemoConfig().max_new_tokens == 20
    assert DemoConfig(bits=9, generate_max_new_tokens=None).max_new_tokens == 13
    assert DemoConfig(generate_max_new_tokens=12).max_new_tokens == 12
    assert DemoConfig(generate_max_new_tokens=0).max_new_tokens is None
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="generate_max_new_tokens"):
            DemoConfig(generate_max_new_tokens=bad)


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_generation_option_rejects_what_is_not_a_budget(value, capsys):
    from mllm_metrics.demo.cli import _parser

    with pytest.raises(SystemExit):
        _parser("mllm-metrics demo").parse_args(["--generate-max-new-tokens", value])
    assert "--generate-max-new-tokens" in capsys.readouterr().err
