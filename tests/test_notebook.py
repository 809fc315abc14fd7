"""notebooks/quickstart.ipynb: committed with outputs, and it still runs top to bottom."""

from __future__ import annotations

import base64
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
DEMO_PNG = NOTEBOOK.parents[1] / "docs" / "demo.png"


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _printed(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in _code_cells(notebook)
        for output in cell.get("outputs", [])
        if output.output_type == "stream" and output.name == "stdout"
    )


def _check_outputs(notebook) -> None:
    for cell in _code_cells(notebook):
        assert cell.execution_count is not None, cell.source[:80]
        for output in cell.get("outputs", []):
            assert output.output_type != "error", output.get("evalue")
    printed = _printed(notebook)
    assert "exact-match 0.500" in printed and "MulticlassExactMatch: 0.667" in printed  # (a)
    assert "do not line up with `target` of shape" in printed  # (b): the clear error
    # (d): the Trainer path reports exactly the numbers of the Lightning path.
    pairs = re.findall(r"(eval_\w+)\s+([\d.]+)\s+Lightning: ([\d.]+)", printed)
    assert {name for name, _, _ in pairs} == {"eval_bit_match", "eval_exact_match", "eval_nll"}
    for name, trainer_value, lightning_value in pairs:
        assert trainer_value == lightning_value, name
    assert "| step | val/loss |" in printed  # (e): the demo's table
    # (f): the per-group values, wrong samples from the records, the report of the demo's.
    header = re.search(r"^\s+all\s+few-ones\s+many-ones\s+macro$", printed, re.MULTILINE)
    assert header, "the per-group table"
    for name in ("val/bit_match", "val/exact_match"):
        assert re.search(rf"^{name}(\s+[01]\.\d{{3}}){{4}}$", printed, re.MULTILINE), name
    assert re.search(r"^  prediction [01]+\n  reference  [01]{16}\n", printed, re.MULTILINE)
    assert "| step | group | samples | bit_match | exact_match | nll |" in printed
    assert re.search(r"Worst 5 of the \d+ samples with an error at step 500", printed)
    images = [
        output
        for cell in _code_cells(notebook)
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    # The bit images, plot(), the curves, the committed demo.png, the records' report.
    assert len(images) >= 5
    # The demo's picture is the committed one, not an older copy.
    [shown] = [
        output
        for cell in _code_cells(notebook)
        if "demo.png" in cell.source
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert base64.b64decode(shown["data"]["image/png"]) == DEMO_PNG.read_bytes()


def test_committed_notebook_has_the_outputs_of_a_full_run():
    _check_outputs(nbformat.read(NOTEBOOK, as_version=4))


def test_notebook_runs_top_to_bottom(monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in _code_cells(notebook):
        cell.outputs, cell.execution_count = [], None
    # The "python3" kernel spec starts `python`: make it this interpreter.
    monkeypatch.setenv(
        "PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    _check_outputs(notebook)
