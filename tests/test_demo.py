"""The demo: synthetic data, tokenizer, a short CLI run, DDP and the Trainer backend."""

from __future__ import annotations

import csv
import json
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
    GROUPS,
    PROMPT,
    BitImageCollator,
    BitImageDataset,
    char_tokenizer,
    draw_bit_images,
    ones_group,
)
from mllm_metrics.labels import aligned_forward  # noqa: E402

# A run of a few steps: enough for the weights to move and the metrics to change.
SHORT = ["--max-steps", "6", "--val-every", "3", "--no-progress-bar"]
# A short run (seconds) whose answers go from all wrong to mostly right: 4 bits, one per patch.
FAST_LEARNER = {"bits": 4, "patch_cells": 1, "max_steps": 150, "val_every": 50, "val_size": 64}


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


def _read_records(directory: Path) -> dict[str, list[dict]]:
    """Every ``*.jsonl`` file of a records directory, by name, read with plain json."""
    return {
        path.name: [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(directory.glob("*.jsonl"))
    }


def _group_by_hand(answer: str) -> str:
    """The group of an answer from its count of ones (independent of the demo's code)."""
    ones = sum(1 for character in answer if character == "1")
    return "few-ones" if ones <= len(answer) / 2 else "many-ones"


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


@pytest.mark.parametrize("bits", [16, 9, 4])
def test_each_sample_is_grouped_by_its_count_of_ones(bits):
    data = BitImageDataset(300, bits, seed=5, cell_size=2, noise=0.0)
    side = math.ceil(math.sqrt(bits))
    seen = set()
    for index in range(len(data)):
        row = data[index]
        # Count the white cells of the image itself, not the answer the code derived.
        ones = sum(m > 0.5 for m in _cell_means(row["image"], side, 2)[:bits])
        expected = "few-ones" if 2 * ones <= bits else "many-ones"
        assert row["group"] == expected == _group_by_hand(row["answer"]), row["answer"]
        seen.add(row["group"])
    assert seen == set(GROUPS) == {"few-ones", "many-ones"}
    # Exactly half of the bits set is "few": 8 of 16, 2 of 4 (seed 0's first answer is 0110).
    assert BitImageDataset(1, 4, seed=0)[0]["answer"] == "0110"
    assert BitImageDataset(1, 4, seed=0)[0]["group"] == "few-ones"


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


def test_collator_adds_the_groups_only_when_asked():
    tokenizer = char_tokenizer()
    rows = [BitImageDataset(6, 16, seed=2)[i] for i in range(6)]
    plain = BitImageCollator(tokenizer)(rows)
    # transformers.Trainer calls model(**batch): by default no key the model does not take.
    assert set(plain) == {"input_ids", "attention_mask", "labels", "images"}
    for key in ("group", "subset"):
        grouped = BitImageCollator(tokenizer, group_key=key)(rows)
        assert set(grouped) == {*plain, key}
        assert grouped[key] == [_group_by_hand(row["answer"]) for row in rows]
        assert set(grouped[key]) == set(GROUPS)  # both occur in these rows
        for name, value in plain.items():
            assert torch.equal(grouped[name], value), name
    with pytest.raises(ValueError, match="group_key"):
        BitImageCollator(tokenizer, group_key="")
    assert BitImageCollator(tokenizer, group_key=None)(rows).keys() == plain.keys()


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


# Rows whose free-running exact-match may differ from the teacher-forced one in a validation: an
# argmax near-tie can break differently in the cached decoding loop than in the full forward.
MAX_NEAR_TIES = 2


def _check_records_against_history(
    records: dict[str, list[dict]],
    rows: list[dict[str, str]],
    stage: str,
    val_size: int,
    bits: int = 16,
) -> int:
    """Each validation's records file: one line per sample, whose sums give the logged values.

    Returns the number of samples, over all the files, whose free-running ``gen_exact`` differs
    from the teacher-forced ``exact`` (each row has one answer: both agree up to near-ties).
    """
    assert list(records) == [f"{stage}_step{int(float(row['step'])):07d}.jsonl" for row in rows]
    mismatches = 0
    for lines, row in zip(records.values(), rows, strict=True):
        assert [line["index"] for line in lines] == list(range(val_size))
        supervised = sum(line["supervised_tokens"] for line in lines)
        assert supervised == (bits + 1) * val_size  # the bits and </s> per answer
        correct = sum(line["correct_tokens"] for line in lines)
        assert correct / supervised == pytest.approx(float(row["val/bit_match"]), rel=1e-6)
        exact = sum(line["exact"] is True for line in lines) / val_size
        assert exact == pytest.approx(float(row["val/exact_match"]), abs=1e-7)
        nll = sum(line["nll"] for line in lines) / supervised
        assert nll == pytest.approx(float(row["val/loss"]), rel=1e-5)
        for line in lines:
            assert 0 <= line["correct_tokens"] <= line["supervised_tokens"] == bits + 1
            assert line["exact"] == (line["correct_tokens"] == bits + 1)
            # The decoded answer (</s> is a special token, skipped).
            assert len(line["reference"]) == bits and set(line["reference"]) <= {"0", "1"}
            if line["exact"]:
                assert line["prediction"] == line["reference"]
        mismatches += _check_free_running(lines, row, val_size)
    return mismatches


def _check_free_running(lines: list[dict], row: dict[str, str], val_size: int) -> int:
    """The records' ``gen_exact`` and ``generated`` against the logged ``val/gen_*`` values."""
    gen_exact_match = float(row["val/gen_exact_match"])
    if math.isnan(gen_exact_match):  # nothing generated: no free-running record fields
        assert math.isnan(float(row["val/gen_bit_match"]))
        assert all("gen_exact" not in line and "generated" not in line for line in lines)
        return 0
    assert 0.0 <= float(row["val/gen_bit_match"]) <= 1.0
    hits = sum(line["gen_exact"] is True for line in lines)
    assert hits / val_size == pytest.approx(gen_exact_match, abs=1e-7)
    for line in lines:
        assert isinstance(line["gen_exact"], bool) and isinstance(line["generated"], str)
        if line["gen_exact"]:
            assert line["generated"] == line["reference"]
    mismatches = sum(line["gen_exact"] != line["exact"] for line in lines)
    assert mismatches <= MAX_NEAR_TIES, f"step {row['step']}: {mismatches} rows"
    exact_match = float(row["val/exact_match"])
    assert abs(gen_exact_match - exact_match) <= MAX_NEAR_TIES / val_size + 1e-7
    return mismatches


def test_short_run_writes_csv_table_png_and_records(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *SHORT]) == 0
    printed = capsys.readouterr().out
    assert "data set labels" in printed and "processed labels" in printed
    assert str(out / "metrics.png") in printed
    last = printed.rstrip("\n").splitlines()[-1]
    assert last == f"Records: 3 files; read them with mllm-metrics report {out / 'records'}"
    columns, rows = _read_csv(out / "metrics.csv")
    assert columns == ["step", *METRIC_KEYS]
    assert {"val/gen_bit_match", "val/gen_exact_match"} <= set(columns)  # free-running twins
    assert [int(row["step"]) for row in rows] == [0, 3, 6]
    for row in rows:
        for key in METRIC_KEYS[1:]:
            assert 0.0 <= float(row[key]) <= 1.0
        assert row["val/gen_exact_match"] == row["val/exact_match"]  # one answer per row
    table = (out / "table.md").read_text().splitlines()
    assert table[0].endswith("| val/gen_bit_match | val/gen_exact_match |")
    assert "free-running: bit-match" in printed  # the final line gives both kinds
    assert float(rows[-1]["val/loss"]) < float(rows[0]["val/loss"])  # it trained
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text().startswith("| step | val/loss |")
    records = _read_records(out / "records")
    _check_records_against_history(records, rows, "val", val_size=256)
    _, val = build_data(DemoConfig())
    for lines in records.values():
        for line in lines:
            answer = val[line["index"]]["answer"]
            assert line["reference"] == answer
            assert line["group"] == _group_by_hand(answer)
    assert {line["group"] for line in records["val_step0000006.jsonl"]} == set(GROUPS)


def test_last_step_is_validated_when_not_a_multiple(tmp_path):
    # An earlier run's records files go; other files in the directory stay.
    (tmp_path / "records").mkdir()
    for name in ("val_step0000999.jsonl", "eval_step0000004.jsonl", "notes.txt"):
        (tmp_path / "records" / name).write_text("{}\n")
    result = run_demo(
        out=tmp_path, max_steps=5, val_every=3, val_size=16, progress_bar=False, verbose=False
    )
    assert [row["step"] for row in result.history] == [0, 3, 5]
    assert result.records_dir == tmp_path / "records"
    assert sorted(path.name for path in result.records_dir.iterdir()) == [
        "notes.txt",
        "val_step0000000.jsonl",
        "val_step0000003.jsonl",
        "val_step0000005.jsonl",
    ]


def test_table_shows_a_missing_value_as_a_dash():
    from mllm_metrics.demo.cli import format_table

    row = {"step": 5.0, **{key: 0.5 for key in METRIC_KEYS}, "val/gen_bit_match": math.nan}
    del row["val/gen_exact_match"]
    header, rule, line = format_table([row]).splitlines()
    assert header == "| step | " + " | ".join(METRIC_KEYS) + " |"
    assert line == "| 5 | " + " | ".join(["0.500"] * (len(METRIC_KEYS) - 2) + ["-", "-"]) + " |"


def test_generation_off_leaves_the_free_running_columns_empty(tmp_path):
    result = run_demo(
        out=tmp_path,
        max_steps=1,
        val_every=1,
        val_size=8,
        generate_max_new_tokens=0,
        progress_bar=False,
        verbose=False,
    )
    for row in result.history:
        assert math.isnan(row["val/gen_bit_match"]) and math.isnan(row["val/gen_exact_match"])
        assert 0.0 <= row["val/bit_match"] <= 1.0
    assert all(line.endswith("| - | - |") for line in result.table.splitlines()[2:])
    for lines in _read_records(result.records_dir).values():
        assert all("gen_exact" not in line for line in lines)


def test_free_running_exact_match_is_the_teacher_forced_one_row_by_row(tmp_path):
    # Greedy decoding reproduces a one-answer row whole exactly when every answer token is the
    # argmax given the true prefix: gen_exact_match = exact_match, and gen_exact = exact for
    # each sample (up to argmax near-ties), while answers go from all wrong to mostly right.
    result = run_demo(out=tmp_path, **FAST_LEARNER, progress_bar=False, verbose=False)
    rows = [{key: str(value) for key, value in row.items()} for row in result.history]
    records = _read_records(result.records_dir)
    mismatches = _check_records_against_history(
        records, rows, "val", FAST_LEARNER["val_size"], bits=FAST_LEARNER["bits"]
    )
    assert mismatches <= MAX_NEAR_TIES
    exact = [row["val/exact_match"] for row in result.history]
    assert exact[0] == 0.0 and any(0.3 < value < 1.0 for value in exact), exact  # not only 0 == 0
    for row in result.history:
        assert row["val/gen_exact_match"] == pytest.approx(row["val/exact_match"], abs=0.02)
        assert 0.0 <= row["val/gen_bit_match"] <= 1.0
    # A free-running answer is the model's own: some differ from the teacher-forced argmax.
    assert any(
        line["generated"] != line["prediction"] for lines in records.values() for line in lines
    )


def test_cli_usage_and_errors(capsys):
    assert main([]) == 2
    assert main(["nope"]) == 2
    assert "mllm-metrics demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--devices", "3"])  # 32 rows do not split over 3 processes
    assert "multiple of `devices`" in capsys.readouterr().err


def test_ddp_on_two_processes_gives_the_one_process_numbers_and_records(tmp_path):
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
    # The records: the same files, samples and order; every integer and string exactly.
    single_records = _read_records(tmp_path / "single" / "records")
    ddp_records = _read_records(tmp_path / "ddp" / "records")
    assert (
        list(ddp_records)
        == list(single_records)
        == [f"val_step{step:07d}.jsonl" for step in (0, 3, 6)]
    )
    for name, single_lines in single_records.items():
        assert len(ddp_records[name]) == len(single_lines) == 256, name
        for ddp_line, single_line in zip(ddp_records[name], single_lines, strict=True):
            assert list(ddp_line) == list(single_line)
            assert ddp_line["nll"] == pytest.approx(single_line["nll"], rel=1e-5)
            assert {**ddp_line, "nll": None} == {**single_line, "nll": None}


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
        for key in METRIC_KEYS[1:]:  # the free-running ones too: the Trainer generates now
            assert hf_row[key] == pytest.approx(pl_row[key], abs=0.005), key
    # Its table and its CSV are whole: nothing left out.
    for line in hf.table.splitlines()[2:]:
        assert "| - |" not in line and "nan" not in line
    _, csv_rows = _read_csv(hf.csv_path)
    assert all(row[key] != "nan" for row in csv_rows for key in METRIC_KEYS)
    # The Trainer writes the same records: each sample's group and generated answer.
    hf_records = _read_records(hf.records_dir)
    columns = [{key: str(value) for key, value in row.items()} for row in hf.history]
    _check_records_against_history(hf_records, columns, "eval", val_size=256)
    _, val = build_data(DemoConfig())
    for lines in hf_records.values():
        assert [line["reference"] for line in lines] == [row["answer"] for row in val]
        assert [line["group"] for line in lines] == [ones_group(row["answer"]) for row in val]
        assert all(isinstance(line["generated"], str) for line in lines)
    # Its text metrics are the decoded records' (rows with a supervised label; "01" kept).
    for lines, row in zip(hf_records.values(), hf.history, strict=True):
        exact = sum(line["prediction"] == line["reference"] for line in lines) / len(lines)
        assert row["val/text_exact_match"] == pytest.approx(exact, abs=1e-7)
        correct = total = 0
        for line in lines:
            predicted = "".join(c for c in line["prediction"] if c in "01")
            correct += sum(a == b for a, b in zip(predicted, line["reference"]))
            total += max(len(predicted), len(line["reference"]))
        assert row["val/text_bit_match"] == pytest.approx(correct / total, rel=1e-6)


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


def _hides(first, second) -> bool:
    """Whether ``second``, drawn after ``first`` on nearly the same values, hides it: the same
    marker, or a filled one at least as large."""
    if first.get_marker() == second.get_marker():
        return True
    hollow = str(second.get_markerfacecolor()) == "none"
    return not hollow and second.get_markersize() >= first.get_markersize()


def test_plot_shows_every_series_readably(tmp_path):
    import matplotlib.image
    from matplotlib.text import Text

    from mllm_metrics.demo.cli import plot_history

    history = _default_run_history()
    exact = [r["val/exact_match"] for r in history]
    # Here the text and the free-running exact-match equal the exact-match at every step, and
    # the free-running bit-match is below the teacher-forced one while the model errs.
    assert [r["val/text_exact_match"] for r in history] == exact
    assert [r["val/gen_exact_match"] for r in history] == exact
    assert history[0]["val/gen_bit_match"] < history[0]["val/bit_match"] - 0.1
    fig = plot_history(history, tmp_path / "plot.png", title="demo")
    drawn = {}
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        for i, line in enumerate(lines):
            values = list(line.get_ydata())
            drawn[line.get_label()] = values
            for later in lines[i + 1 :]:  # no curve hides another
                gap = max(abs(a - b) for a, b in zip(values, later.get_ydata(), strict=True))
                assert gap > 0.05 or not _hides(line, later), (line.get_label(), later.get_label())
        # Each panel names its curves.
        legend = ax.get_legend()
        if lines and legend is not None:
            assert [t.get_text() for t in legend.get_texts()] == [x.get_label() for x in lines]
    for key in METRIC_KEYS[1:]:
        assert drawn[key] == [row[key] for row in history], key
    for key in ("bit_match", "exact_match"):
        gap = drawn[f"val/gen_{key} − val/{key}"]
        expected = [row[f"val/gen_{key}"] - row[f"val/{key}"] for row in history]
        assert gap == pytest.approx(expected)
    assert any(values == [row["val/loss"] for row in history] for values in drawn.values())
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert min(t.get_fontsize() for t in texts) >= 10  # legible in a README
    # The picture says which twins coincide and which lags.
    said = "\n".join(t.get_text() for t in texts)
    assert "text_exact_match = exact_match" in said
    assert "free-running gen_exact_match = exact_match at all 21 validations" in said
    below = sum(row["val/gen_bit_match"] < row["val/bit_match"] for row in history)
    assert 0 < below < 21  # the committed run: below while the model errs, equal after
    assert f"free-running gen_bit_match vs bit_match: below at {below} of 21 validations" in said
    height, width = matplotlib.image.imread(tmp_path / "plot.png").shape[:2]
    fig_width, fig_height = fig.get_size_inches()
    assert (width, height) == (round(fig_width * 150), round(fig_height * 150))  # 150 dpi


def test_plot_of_a_run_without_free_running_values(tmp_path):
    from mllm_metrics.demo.cli import plot_history

    history = [
        {**row, "val/gen_bit_match": math.nan, "val/gen_exact_match": math.nan}
        for row in _default_run_history()
    ]
    fig = plot_history(history, tmp_path / "plot.png")
    said = "\n".join(
        text.get_text() for text in fig.texts + [t for ax in fig.axes for t in ax.texts]
    )
    assert "no free-running values" in said and "free-running gen_" not in said


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
