"""The ``mllm-metrics`` command (``mllm_metrics.cli:main``): ``--version`` and the dispatch.

The version expected is read from pyproject.toml (the source of the installed metadata), not
from the code under test; the dispatch is checked by what each subcommand prints or receives.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import mllm_metrics
from mllm_metrics import cli

ROOT = Path(__file__).resolve().parents[1]
RECORD = {"index": 0, "supervised_tokens": 4, "correct_tokens": 3, "exact": False, "nll": 2.0}


def _project_version() -> str:
    # tomllib is Python 3.11+; the project supports 3.10: the [project] table's version line.
    match = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match, "no version line in pyproject.toml"
    return match.group(1)


def test_version_is_the_projects(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"mllm-metrics {_project_version()}\n"
    # The package's own constant agrees (the fallback below prints it).
    assert mllm_metrics.__version__ == _project_version()


def test_version_falls_back_to_the_package_constant(monkeypatch, capsys):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    monkeypatch.setattr(mllm_metrics, "__version__", "9.8.7")
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == "mllm-metrics 9.8.7\n"


def test_help_lists_the_commands_and_version(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("demo", "report", "--version", "--html"):
        assert word in out


@pytest.mark.parametrize("argv", [[], ["train"]])
def test_no_or_unknown_command_is_a_usage_error(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: mllm-metrics demo" in captured.err
    if argv:
        assert "unknown command 'train'" in captured.err


def test_report_is_dispatched_with_its_options(tmp_path, capsys):
    records = tmp_path / "records"
    records.mkdir()
    (records / "val_step0000007.jsonl").write_text(json.dumps(RECORD) + "\n")
    page = tmp_path / "page.html"
    assert cli.main(["report", str(records), "--no-plot", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    # One sample, 3 of 4 tokens right: bit-match 0.750, exact-match 0.
    assert "| 7 | all | 1 | 0.750 | 0.000 | 0.500 |" in out
    assert out.rstrip().endswith(f"HTML: {page}")
    assert page.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "--help"])
    assert exit_info.value.code == 0
    assert "--html FILE" in capsys.readouterr().out


def test_demo_is_dispatched_to_the_demo_parser(monkeypatch):
    import mllm_metrics.demo.cli as demo_cli

    calls = []
    monkeypatch.setattr(demo_cli, "demo_main", lambda argv, prog: calls.append((argv, prog)) or 5)
    assert cli.main(["demo", "--max-steps", "3"]) == 5
    assert calls == [(["--max-steps", "3"], "mllm-metrics demo")]


def test_old_entry_point_still_dispatches(tmp_path, capsys):
    from mllm_metrics.demo.cli import main as old_main

    (tmp_path / "val_step0000001.jsonl").write_text(json.dumps(RECORD) + "\n")
    assert old_main(["report", str(tmp_path), "--no-plot"]) == 0
    assert "| 1 | all | 1 | 0.750 |" in capsys.readouterr().out


def test_help_and_version_need_no_framework():
    """With Lightning and transformers blocked (as if not installed), help and --version work
    and import no framework."""
    package_root = Path(mllm_metrics.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), *sys.path])}
    blocked = ("lightning", "transformers")
    code = (
        "import sys\nimport mllm_metrics\n"
        f"for name in [*sys.modules, *{blocked!r}]:\n"
        f"    if name.split('.')[0] in {blocked!r}:\n"
        "        sys.modules[name] = None\n"
        "before = set(sys.modules)\n"
        "from mllm_metrics.cli import main\n"
        "assert main(['--version']) == 0 and main(['--help']) == 0\n"
        "try:\n    main(['demo', '--help'])\n"
        "except SystemExit as exit:\n    assert exit.code == 0\n"
        "heavy = ('transformers', 'lightning', 'matplotlib', 'tokenizers', 'accelerate')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"mllm-metrics {_project_version()}"
    assert "--max-steps" in result.stdout  # demo --help printed its options
    assert lines[-1] == "[]"
