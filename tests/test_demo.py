"""The demo: synthetic data, tokenizer, a short CLI run, DDP and the Trainer backend."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

import mllm_metrics  # noqa: E402
from mllm_metrics.demo.cli import (  # noqa: E402
    METRIC_KEYS,
    DemoConfig,
    build_data,
    build_model,
    main,
    run_demo,
)
from mllm_metrics.demo.data import (  # noqa: E402
    PROMPT,
    BitImageCollator,
    BitImageDataset,
    char_tokenizer,
    draw_bit_images,
)
from mllm_metrics.labels import aligned_forward  # noqa: E402

# A run of a few steps: enough for the weights to move and the metrics to change.
SHORT = ["--max-steps", "6", "--val-every", "3", "--no-progress-bar"]


def _cell_means(image: torch.Tensor, side: int, cell: int) -> list[float]:
    """Mean of each cell in reading order, by plain slicing (independent of the demo's code)."""
    return [
        image[0, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].mean().item()
        for r in range(side)
        for c in range(side)
    ]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _run_cli(out: Path, *options: str, timeout: int = 300) -> list[dict[str, str]]:
    # The subprocess imports the mllm_metrics this test imported (wherever it is installed).
    package_root = Path(mllm_metrics.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), *sys.path])}
    command = [sys.executable, "-m", "mllm_metrics.demo", "--out", str(out), *SHORT, *options]
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, env=env, check=True, timeout=timeout, cwd=out.parent)
    return _read_csv(out / "metrics.csv")[1]


# ---- data ----------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_seeded():
    first, again = BitImageDataset(50, 16, seed=3), BitImageDataset(50, 16, seed=3)
    other = BitImageDataset(50, 16, seed=4)
    assert torch.equal(first.bits, again.bits) and torch.equal(first.images, again.images)
    assert not torch.equal(first.bits, other.bits)
    assert 0.3 < first.bits.float().mean() < 0.7  # both values occur


@pytest.mark.parametrize("bits, cell", [(16, 3), (12, 2), (5, 4)])
def test_images_encode_the_bits_in_reading_order(bits, cell):
    data = BitImageDataset(200, bits, seed=0, cell_size=cell, noise=0.1)
    side = math.ceil(math.sqrt(bits))
    assert data.images.shape == (200, 1, side * cell, side * cell)
    for index in range(len(data)):
        means = _cell_means(data.images[index], side, cell)
        decoded = "".join("1" if m > 0.5 else "0" for m in means[:bits])
        assert decoded == data[index]["answer"]
        assert all(abs(m - 0.5) < 0.2 for m in means[bits:])  # unused cells are gray


def test_default_noise_keeps_the_task_solvable():
    config = DemoConfig()
    _, val = build_data(config)
    side = val.image_size // config.cell_size
    wrong = 0
    for index in range(len(val)):
        means = _cell_means(val.images[index], side, config.cell_size)[: config.bits]
        wrong += "".join("1" if m > 0.5 else "0" for m in means) != val[index]["answer"]
    assert wrong <= 0.05 * len(val)  # a thresholding reader gets >= 95% of the answers right


def test_draw_without_noise_is_exact():
    images = draw_bit_images(torch.tensor([[1, 0, 1, 1]]), cell_size=2, noise=0.0)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]).float()
    assert torch.equal(images[0, 0], expected)


# ---- tokenizer and collator ---------------------------------------------------------------------


def test_tokenizer_round_trips_without_spaces():
    tokenizer = char_tokenizer()
    for text in ["0110", "1", PROMPT, "0 1  10:"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids) == text
    ids = tokenizer("0110", add_special_tokens=False)["input_ids"]
    wrapped = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.batch_decode([wrapped], skip_special_tokens=True) == ["0110"]
    # The ids the tiny model's config expects for its special tokens.
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_collator_supervises_only_the_answer():
    tokenizer = char_tokenizer()
    rows = [BitImageDataset(3, 9, seed=1)[i] for i in range(3)]
    batch = BitImageCollator(tokenizer)(rows)
    assert batch["images"].shape == (3, 1, 6, 6)
    assert ((batch["input_ids"] == -200).sum(dim=1) == 1).all()  # one image per row
    for row, labels in zip(rows, batch["labels"], strict=True):
        supervised = labels[labels != -100].tolist()
        assert tokenizer.decode(supervised, skip_special_tokens=True) == row["answer"]
        assert supervised[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("patch_cells, positions", [(1, 16), (2, 4)])
def test_forward_expands_each_placeholder_into_one_position_per_patch(patch_cells, positions):
    config = DemoConfig(bits=16, cell_size=3, patch_cells=patch_cells)
    tokenizer = char_tokenizer()
    model = build_model(config, tokenizer)
    rows = [BitImageDataset(2, 16, seed=0, cell_size=3)[i] for i in range(2)]
    batch = BitImageCollator(tokenizer)(rows)
    result = aligned_forward(model, batch)
    assert result.labels.shape[1] == batch["labels"].shape[1] - 1 + positions
    assert torch.equal(result.labels[:, -17:], batch["labels"][:, -17:])  # answers unchanged
    assert (result.labels[:, :-17] == -100).all()


# ---- the command line -----------------------------------------------------------------------


def test_short_run_writes_csv_table_and_png(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *SHORT]) == 0
    printed = capsys.readouterr().out
    assert "data set labels" in printed and "processed labels" in printed
    assert str(out / "metrics.png") in printed
    columns, rows = _read_csv(out / "metrics.csv")
    assert columns == ["step", *METRIC_KEYS]
    assert [int(row["step"]) for row in rows] == [0, 3, 6]
    for row in rows:
        for key in METRIC_KEYS[1:]:
            assert 0.0 <= float(row[key]) <= 1.0
    assert float(rows[-1]["val/loss"]) < float(rows[0]["val/loss"])  # it trained
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text().startswith("| step | val/loss |")


def test_last_step_is_validated_when_not_a_multiple(tmp_path):
    result = run_demo(
        out=tmp_path, max_steps=5, val_every=3, val_size=16, progress_bar=False, verbose=False
    )
    assert [row["step"] for row in result.history] == [0, 3, 5]


def test_cli_usage_and_errors(capsys):
    assert main([]) == 2
    assert main(["nope"]) == 2
    assert "mllm-metrics demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--devices", "3"])  # 32 rows do not split over 3 processes
    assert "multiple of `devices`" in capsys.readouterr().err


def test_ddp_on_two_processes_gives_the_one_process_numbers(tmp_path):
    single = _run_cli(tmp_path / "single", "--devices", "1")
    ddp = _run_cli(tmp_path / "ddp", "--devices", "2")
    assert [row["step"] for row in ddp] == [row["step"] for row in single] == ["0", "3", "6"]
    for ddp_row, single_row in zip(ddp, single, strict=True):
        for key in METRIC_KEYS:
            if key == "val/loss":  # a float sum taken in another order
                assert float(ddp_row[key]) == pytest.approx(float(single_row[key]), rel=1e-4)
            else:  # ratios of integer counts
                assert ddp_row[key] == single_row[key], key
    assert single[0] != single[-1]  # training changed the numbers


def test_trainer_backend_gives_the_lightning_numbers(tmp_path):
    common = {"max_steps": 6, "val_every": 3, "progress_bar": False, "verbose": False}
    lightning = run_demo(out=tmp_path / "lightning", **common)
    hf = run_demo(out=tmp_path / "hf", backend="hf", **common)
    assert [row["step"] for row in hf.history] == [0, 3, 6]
    # Same rows, micro-batches, optimizer and schedule; the two frameworks scale the loss in
    # different (equivalent) ways, so the weights may differ in the last bits: a token whose
    # argmax is a near tie could flip. Misaligned labels would change everything.
    for hf_row, pl_row in zip(hf.history, lightning.history, strict=True):
        assert hf_row["val/loss"] == pytest.approx(pl_row["val/loss"], rel=1e-4)
        for key in METRIC_KEYS[1:]:
            assert hf_row[key] == pytest.approx(pl_row[key], abs=0.005), key


# ---- the progress bar -------------------------------------------------------------------------


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar the demo's progress module opens."""
    from mllm_metrics.demo import progress

    opened = []

    class Recording(progress.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(progress, "tqdm", Recording)
    return opened


@pytest.mark.parametrize("backend", ["lightning", "hf"])
def test_progress_bar_counts_optimizer_steps(tmp_path, capfd, bars, backend):
    result = run_demo(
        out=tmp_path,
        backend=backend,
        max_steps=4,
        val_every=2,
        val_size=16,
        progress_bar=True,
        verbose=False,
    )
    printed = "".join(capfd.readouterr())
    assert len(bars) == 1  # one bar for the whole run: none per validation
    (bar,) = bars
    assert bar.total == bar.n == 4  # optimizer steps, not the 8 micro-batches
    final = result.history[-1]
    assert bar.postfix == (
        f"val bit_match {final['val/bit_match']:.3f} exact_match {final['val/exact_match']:.3f}"
    )
    assert "Validation" not in printed and "Epoch" not in printed  # Lightning's own bars
    assert "eval_loss" not in printed  # the Trainer's log dictionaries
    drawn = [line for line in printed.replace("\r", "\n").splitlines() if line.startswith("step ")]
    assert drawn and max(len(line) for line in drawn) <= 80


def test_no_progress_bar_opens_none(tmp_path, capfd, bars):
    run_demo(out=tmp_path, max_steps=2, val_every=1, val_size=16, progress_bar=False)
    assert bars == []
    assert "\r" not in "".join(capfd.readouterr())


def test_lightning_trainer_uses_the_step_bar():
    from mllm_metrics.demo.lightning_backend import History, StepProgressBar, _trainer

    trainer = _trainer(DemoConfig(), History(METRIC_KEYS), epochs=1)
    assert isinstance(trainer.progress_bar_callback, StepProgressBar)
    quiet = _trainer(DemoConfig(progress_bar=False), History(METRIC_KEYS), epochs=1)
    assert quiet.progress_bar_callback is None


# ---- the picture --------------------------------------------------------------------------------


def _default_run_history() -> list[dict[str, float]]:
    """The 21 validations of the default run, as committed in docs/demo_table.md."""
    lines = (Path(__file__).resolve().parents[1] / "docs" / "demo_table.md").read_text()
    rows = [line.strip("| ").split(" | ") for line in lines.splitlines()[2:] if line.strip()]
    return [dict(zip(["step", *METRIC_KEYS], map(float, row), strict=True)) for row in rows]


def test_plot_shows_every_series_readably(tmp_path):
    import matplotlib.image
    from matplotlib.text import Text

    from mllm_metrics.demo.cli import plot_history

    history = _default_run_history()
    # Here the text exact-match equals the exact-match at every step.
    assert [r["val/text_exact_match"] for r in history] == [r["val/exact_match"] for r in history]
    fig = plot_history(history, tmp_path / "plot.png", title="demo")
    drawn = {}
    for ax in fig.axes:
        curves = [(line.get_label(), list(line.get_ydata())) for line in ax.get_lines()]
        for i, (label, values) in enumerate(curves):
            drawn[label] = values
            for other, other_values in curves[i + 1 :]:  # no curve hides another
                gap = max(abs(a - b) for a, b in zip(values, other_values, strict=True))
                assert gap > 0.05, f"{label} and {other} coincide in one panel"
    for key in METRIC_KEYS[1:]:
        assert drawn[key] == [row[key] for row in history], key
    assert any(values == [row["val/loss"] for row in history] for values in drawn.values())
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert min(t.get_fontsize() for t in texts) >= 10  # legible in a README
    # The picture says that the text twin coincides with the token metric.
    assert any("text_exact_match = exact_match" in t.get_text() for t in texts)
    height, width = matplotlib.image.imread(tmp_path / "plot.png").shape[:2]
    fig_width, fig_height = fig.get_size_inches()
    assert (width, height) == (round(fig_width * 150), round(fig_height * 150))  # 150 dpi


def test_without_matplotlib_the_demo_finishes_without_the_picture(tmp_path):
    # torchmetrics imports matplotlib when it is installed: block it after `import mllm_metrics`.
    code = (
        "import sys, mllm_metrics\n"
        "for name in [*sys.modules, 'matplotlib']:\n"
        "    if name.split('.')[0] == 'matplotlib':\n"
        "        sys.modules[name] = None\n"
        "from mllm_metrics.demo.cli import main\n"
        f"sys.exit(main(['demo', '--out', {str(tmp_path / 'out')!r}, *{SHORT!r}]))\n"
    )
    package_root = Path(mllm_metrics.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "| step | val/loss |" in result.stdout  # the final table
    notes = [line for line in result.stdout.splitlines() if "matplotlib is not installed" in line]
    assert notes and all('pip install "mllm-metrics[demo]"' in line for line in notes[:1])
    # Said before training (the first note comes before the table), not after a crash.
    assert result.stdout.index(notes[0]) < result.stdout.index("| step |")
    assert (tmp_path / "out" / "metrics.csv").exists()
    assert not (tmp_path / "out" / "metrics.png").exists()
