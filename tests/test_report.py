"""``mllm-metrics report``: records files read back, aggregated, ranked, compared and drawn.

The records are written by hand here and every expected number is worked out in the test from
the records' own counts (as fractions), not taken from the report's output.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mllm_metrics
from mllm_metrics.demo.cli import main
from mllm_metrics.report import (
    RecordsFile,
    format_report,
    load_records,
    plot_report,
    report_main,
    summarize,
    worst_samples,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(index, group, supervised, correct, exact, nll, prediction=None, reference=None):
    record = {
        "index": index,
        "supervised_tokens": supervised,
        "correct_tokens": correct,
        "exact": exact,
        "nll": nll,
    }
    if group is not None:
        record["group"] = group
    if prediction is not None:
        record["prediction"], record["reference"] = prediction, reference
    return record


def _write(directory: Path, name: str, records: list[dict]) -> Path:
    path = directory / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# val, three steps, two groups, the same six samples at each step (the same supervised tokens,
# reference and group per index). Step 300 against step 200: index 0 and 4 go right -> wrong,
# index 1 wrong -> right, index 2 and 5 stay wrong, index 3 has no supervised token (exact null).
VAL_100 = [
    _record(0, "few", 4, 1, False, 5.0, "0000", "0111"),
    _record(1, "few", 4, 2, False, 4.0, "0001", "1011"),
    _record(2, "many", 8, 4, False, 8.0),
    _record(3, "many", 0, 0, None, 0.0),
    _record(4, "many", 8, 4, False, 7.0, "00000000", "01010101"),
    _record(5, "few", 6, 3, False, 6.0, "000000", "010101"),
]
VAL_200 = [
    _record(0, "few", 4, 4, True, 0.2, "0111", "0111"),
    _record(1, "few", 4, 3, False, 1.0, "1001", "1011"),
    _record(2, "many", 8, 6, False, 3.0),
    _record(3, "many", 0, 0, None, 0.0),
    _record(4, "many", 8, 8, True, 0.5, "01010101", "01010101"),
    _record(5, "few", 6, 4, False, 4.5, "000111", "010101"),
]
VAL_300 = [
    _record(0, "few", 4, 2, False, 2.5, "0100", "0111"),
    _record(1, "few", 4, 4, True, 0.3, "1011", "1011"),
    _record(2, "many", 8, 6, False, 2.0),
    _record(3, "many", 0, 0, None, 0.0),
    _record(4, "many", 8, 7, False, 1.6, "01010100", "01010101"),
    _record(5, "few", 6, 3, False, 4.0, "000111", "010101"),
]
# A second dataloader, one step, no group, no text.
VAL_DL1 = [_record(0, None, 5, 5, True, 0.5), _record(1, None, 5, 1, False, 4.5)]
# An evaluation whose step was unknown: call counters 1 and 3.
EVAL_1 = [_record(0, None, 2, 0, False, 3.0), _record(1, None, 2, 2, True, 0.1)]
EVAL_3 = [_record(0, None, 2, 2, True, 0.2), _record(1, None, 2, 1, False, 1.0)]


@pytest.fixture
def records_dir(tmp_path: Path) -> Path:
    # Written out of order, with files that are not records, to check the sorting and filter.
    _write(tmp_path, "val_step0000300.jsonl", VAL_300)
    _write(tmp_path, "eval_call0000003.jsonl", EVAL_3)
    _write(tmp_path, "val_step0000100.jsonl", VAL_100)
    _write(tmp_path, "val_step0000300_dl1.jsonl", VAL_DL1)
    _write(tmp_path, "val_step0000200.jsonl", VAL_200)
    _write(tmp_path, "eval_call0000001.jsonl", EVAL_1)
    (tmp_path / "notes.txt").write_text("not records\n")
    (tmp_path / "val_step.jsonl").write_text("{}\n")
    (tmp_path / "metrics.csv").write_text("step\n")
    return tmp_path


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every pipe-table body row in ``text`` (header and rule lines skipped)."""
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines):
        header = number + 1 < len(lines) and lines[number + 1].startswith("|---")
        if not line.startswith("| ") or header:
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _section(text: str, title: str) -> str:
    """The part of the report under ``## title``, up to the next section."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


# ---- reading -----------------------------------------------------------------------------------


def test_load_records_parses_names_and_sorts(records_dir):
    files = load_records(records_dir)
    got = [(f.stage, f.dataloader, f.kind, f.step, f.path.name) for f in files]
    assert got == [
        ("eval", None, "call", 1, "eval_call0000001.jsonl"),
        ("eval", None, "call", 3, "eval_call0000003.jsonl"),
        ("val", None, "step", 100, "val_step0000100.jsonl"),
        ("val", None, "step", 200, "val_step0000200.jsonl"),
        ("val", None, "step", 300, "val_step0000300.jsonl"),
        ("val", 1, "step", 300, "val_step0000300_dl1.jsonl"),
    ]
    assert files[-2].records == VAL_300
    assert [f.label for f in files[:3]] == ["call 1", "call 3", "100"]


def test_stage_may_hold_underscores_and_lines_are_sorted_by_index(tmp_path):
    _write(tmp_path, "my_eval_step0000040_dl2.jsonl", [VAL_300[2], VAL_300[0], VAL_300[1]])
    (file,) = load_records(tmp_path)
    assert (file.stage, file.step, file.kind, file.dataloader) == ("my_eval", 40, "step", 2)
    assert [record["index"] for record in file.records] == [0, 1, 2]


def test_a_bad_line_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "val_step0000010.jsonl"
    path.write_text(json.dumps(VAL_100[0]) + "\n\n" + '{"index": 1, "supervised_tokens": \n')
    with pytest.raises(ValueError, match=r"val_step0000010\.jsonl, line 3: not valid JSON"):
        load_records(tmp_path)
    path.write_text(json.dumps({"index": 0, "supervised_tokens": 1, "exact": True}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: the record has no 'correct_tokens', 'nll'"):
        load_records(tmp_path)
    path.write_text(json.dumps({**VAL_100[0], "exact": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: 'exact' must be true, false or null"):
        load_records(tmp_path)
    path.write_text("[1, 2]\n")
    with pytest.raises(
        ValueError, match=r"line 1: expected a JSON object \(one record\), got list"
    ):
        load_records(tmp_path)


def test_missing_directory_raises_and_empty_directory_has_no_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No records directory"):
        load_records(tmp_path / "absent")
    assert load_records(tmp_path) == []


# ---- aggregating -------------------------------------------------------------------------------


def test_summarize_step_300_by_hand():
    summary = summarize(VAL_300)
    # Correct tokens 2+4+6+0+7+3 of 4+4+8+0+8+6; exact true 1 of the 5 non-null (index 3 is
    # null); NLL 2.5+0.3+2.0+0.0+1.6+4.0 over the same 30 tokens.
    overall = summary.overall
    assert overall.samples == 6
    assert overall.bit_match == pytest.approx(22 / 30)
    assert overall.exact_match == pytest.approx(1 / 5)
    assert overall.nll == pytest.approx(10.4 / 30)
    assert math.isnan(overall.gen_exact_match)
    assert list(summary.groups) == ["few", "many"]
    few, many = summary.groups["few"], summary.groups["many"]
    # few: index 0, 1, 5; many: index 2, 3, 4.
    assert (few.samples, many.samples) == (3, 3)
    assert few.bit_match == pytest.approx((2 + 4 + 3) / (4 + 4 + 6))
    assert many.bit_match == pytest.approx((6 + 0 + 7) / (8 + 0 + 8))
    assert few.exact_match == pytest.approx(1 / 3)
    assert many.exact_match == 0.0
    assert few.nll == pytest.approx((2.5 + 0.3 + 4.0) / 14)
    assert many.nll == pytest.approx((2.0 + 0.0 + 1.6) / 16)
    macro = summary.macro
    assert macro.samples == 6
    assert macro.bit_match == pytest.approx((9 / 14 + 13 / 16) / 2)
    assert macro.exact_match == pytest.approx((1 / 3 + 0 / 2) / 2)
    assert macro.nll == pytest.approx((6.8 / 14 + 3.6 / 16) / 2)
    assert [name for name, _ in summary.rows()] == ["all", "few", "many", "macro"]


def test_summarize_without_groups_and_with_nothing_to_count():
    summary = summarize(VAL_DL1)
    assert summary.groups == {} and summary.macro is None
    assert summary.overall.bit_match == pytest.approx(6 / 10)
    assert summary.overall.exact_match == pytest.approx(1 / 2)
    assert [name for name, _ in summary.rows()] == ["all"]
    empty = summarize([_record(0, "g", 0, 0, None, 0.0)]).overall
    assert empty.samples == 1
    assert all(math.isnan(v) for v in (empty.bit_match, empty.exact_match, empty.nll))


def test_macro_skips_groups_where_a_metric_is_undefined():
    records = [
        _record(0, "a", 4, 1, False, 2.0),
        _record(1, "b", 0, 0, None, 0.0),  # b has no token: no bit_match, exact or nll
        _record(2, "c", 2, 2, True, 0.4),
    ]
    macro = summarize(records).macro
    assert macro.bit_match == pytest.approx((1 / 4 + 2 / 2) / 2)
    assert macro.exact_match == pytest.approx((0 + 1) / 2)
    assert macro.nll == pytest.approx((2.0 / 4 + 0.4 / 2) / 2)


def test_gen_exact_is_aggregated_and_shown_when_present(tmp_path):
    records = [
        {**_record(0, None, 2, 2, True, 0.1), "gen_exact": True, "generated": "01"},
        {**_record(1, None, 2, 1, False, 1.0), "gen_exact": False, "generated": "00"},
        {**_record(2, None, 2, 2, True, 0.1), "gen_exact": None},
    ]
    assert summarize(records).overall.gen_exact_match == pytest.approx(1 / 2)
    _write(tmp_path, "eval_step0000005.jsonl", records)
    text = format_report(load_records(tmp_path))
    assert "| step | group | samples | bit_match | exact_match | nll | gen_exact_match |" in text
    assert "| generated |" in text


# ---- the report --------------------------------------------------------------------------------


def test_metrics_table_rows(records_dir):
    text = format_report(load_records(records_dir))
    val = _table_rows(_section(text, "val"))
    by_key = {(row[0], row[1]): row[2:6] for row in val if len(row) >= 6}
    assert by_key[("300", "all")] == ["6", f"{22 / 30:.3f}", f"{1 / 5:.3f}", f"{10.4 / 30:.3f}"]
    assert by_key[("300", "few")] == ["3", f"{9 / 14:.3f}", f"{1 / 3:.3f}", f"{6.8 / 14:.3f}"]
    assert by_key[("300", "many")] == ["3", f"{13 / 16:.3f}", "0.000", f"{3.6 / 16:.3f}"]
    macro_bit = (9 / 14 + 13 / 16) / 2
    assert by_key[("300", "macro")][1] == f"{macro_bit:.3f}"
    # Step 100: correct 1+2+4+0+4+3 of 4+4+8+0+8+6 tokens, no exact, NLL 5+4+8+0+7+6.
    assert by_key[("100", "all")] == ["6", f"{14 / 30:.3f}", "0.000", f"{30 / 30:.3f}"]
    # Step 200: index 0 and 4 right of the 5 with an exact (index 3 is null).
    assert by_key[("200", "all")][2] == f"{2 / 5:.3f}"
    steps = [row[0] for row in val[: 3 * 4]]
    assert steps == ["100"] * 4 + ["200"] * 4 + ["300"] * 4
    dl1 = _table_rows(_section(text, "val, dataloader 1"))
    assert dl1[0] == ["300", "all", "2", f"{6 / 10:.3f}", f"{1 / 2:.3f}", f"{5 / 10:.3f}"]
    calls = _section(text, "eval (by evaluation call: the step was unknown)")
    rows = _table_rows(calls)
    assert rows[0][:2] == ["call 1", "all"] and rows[1][:2] == ["call 3", "all"]
    assert rows[1][3] == f"{3 / 4:.3f}"
    # Sections in order: stage, then dataloader.
    assert text.index("## eval") < text.index("## val\n") < text.index("## val, dataloader 1")


def test_undefined_ratios_show_a_dash(tmp_path):
    _write(tmp_path, "test_step0000000.jsonl", [_record(0, None, 0, 0, None, 0.0)])
    text = format_report(load_records(tmp_path))
    assert "| 0 | all | 1 | - | - | - |" in text
    assert "No sample with supervised tokens at step 0." in text
    assert "nan" not in text


def test_worst_samples_of_the_last_step(records_dir):
    val = _section(format_report(load_records(records_dir), worst=3), "val")
    worst = val[val.index("Worst") : val.index("flipped")]
    # Step 300: index 0, 2, 4, 5 have a wrong token; index 1 (4/4) is all right and index 3
    # has no supervised token.
    assert worst.startswith(
        "Worst 3 of the 4 samples with an error at step 300 (lowest share of correct tokens "
        "first, then highest NLL); 1 of the 5 samples with supervised tokens is all right:"
    )
    rows = _table_rows(worst)
    # Shares: index 5 3/6 and index 0 2/4 tie at 1/2, index 5 has the higher NLL (4.0 > 2.5);
    # then index 2 (6/8); index 4 (7/8) is fourth and cut.
    assert [row[0] for row in rows] == ["5", "0", "2"]
    assert rows[0] == ["5", "few", "3/6", f"{3 / 6:.3f}", "4.000", "000111", "010101"]
    assert rows[2] == ["2", "many", "6/8", f"{6 / 8:.3f}", "2.000", "", ""]
    # With room for ten, only the four with an error are listed: index 1 is all right.
    val = _section(format_report(load_records(records_dir), worst=10), "val")
    rows = _table_rows(val[val.index("Worst") : val.index("flipped")])
    assert [row[0] for row in rows] == ["5", "0", "2", "4"]
    assert val[val.index("Worst") :].startswith("Worst 4 of the 4 samples with an error")


def test_worst_says_when_every_sample_is_right(tmp_path):
    _write(tmp_path, "val_step0000001.jsonl", [VAL_200[0], VAL_200[3], VAL_200[4]])
    text = format_report(load_records(tmp_path))
    # Index 0 (4/4) and 4 (8/8) are right; index 3 has no supervised token.
    assert (
        "No sample with an error at step 1: 2 of the 2 samples with supervised tokens are all "
        "right." in text
    )
    assert "Worst" not in text


def test_flips_between_the_last_two_steps(records_dir):
    val = _section(format_report(load_records(records_dir)), "val")
    flips = val[val.index("flipped") :]
    assert "between step 200 and step 300" in flips
    lost = flips[flips.index("right -> wrong") : flips.index("wrong -> right")]
    gained = flips[flips.index("wrong -> right") :]
    assert lost.startswith("right -> wrong: 2\n")
    assert [row[0] for row in _table_rows(lost)] == ["0", "4"]
    # The text of the last step (300), not of step 200.
    assert _table_rows(lost)[0] == ["0", "few", "2/4", "0100", "0111"]
    assert gained.startswith("wrong -> right: 1\n")
    assert _table_rows(gained) == [["1", "few", "4/4", "1011", "1011"]]
    calls = _section(
        format_report(load_records(records_dir)), "eval (by evaluation call: the step was unknown)"
    )
    assert "between call 1 and call 3" in calls
    assert [r[0] for r in _table_rows(calls[calls.index("right -> wrong") :])] == ["1", "0"]


def test_flip_lists_are_capped(records_dir):
    val = _section(format_report(load_records(records_dir), worst=1), "val")
    lost = val[val.index("right -> wrong") : val.index("wrong -> right")]
    assert [row[0] for row in _table_rows(lost)] == ["0"]
    assert "... and 1 more" in lost
    assert "more" not in val[val.index("wrong -> right") :]
    counts_only = _section(format_report(load_records(records_dir), worst=0), "val")
    assert "right -> wrong: 2" in counts_only and "... and 2 more" in counts_only
    assert (
        "4 samples with an error at step 300 (1 of the 5 samples with supervised tokens is all "
        "right); none listed (worst 0)." in counts_only
    )
    assert "| index |" not in counts_only


def test_one_step_says_there_is_nothing_to_compare(records_dir):
    dl1 = _section(format_report(load_records(records_dir)), "val, dataloader 1")
    assert "Only one step (step 300): no flips to compare." in dl1
    assert "flipped" not in dl1
    # No group, no text: the worst table has neither column.
    assert "| index | correct | share | nll |" in dl1


def test_text_cells_stay_on_one_line():
    record = _record(0, "a|b", 4, 0, False, 1.0, "x|y\nz", "w" * 100)
    file = RecordsFile("val", 1, "step", None, Path("val_step0000001.jsonl"), [record])
    rows = _table_rows(format_report([file]))
    worst = rows[-1]
    assert worst[0] == "0" and "x\\|y\\nz" in worst and "a\\|b" in worst
    assert ("w" * 57 + "...") in worst


# ---- the plot ----------------------------------------------------------------------------------


def test_plot_is_a_png(records_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = plot_report(load_records(records_dir), tmp_path / "sub" / "plot.png")
    assert png == tmp_path / "sub" / "plot.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    # 11 x 4.8 inches at 150 dpi (width and height are big-endian in the IHDR chunk).
    assert int.from_bytes(data[16:20], "big") == 1650
    assert int.from_bytes(data[20:24], "big") == 720


def test_plot_draws_one_line_per_group_and_all(records_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))
    )
    plot_report(load_records(records_dir), tmp_path / "p.png")
    (fig,) = figures
    bit_ax, exact_ax = fig.axes
    labels = [line.get_label() for line in bit_ax.lines]
    assert labels == ["eval (calls): all", "val: all", "val: few", "val: many", "val dl1: all"]
    val_all = bit_ax.lines[1]
    assert list(val_all.get_xdata()) == [100, 200, 300]
    assert list(val_all.get_ydata()) == pytest.approx([14 / 30, 25 / 30, 22 / 30])
    # few: index 0, 1, 5; right at step 100: none; at 200: index 0; at 300: index 1.
    assert list(exact_ax.lines[2].get_ydata()) == pytest.approx([0 / 3, 1 / 3, 1 / 3])
    assert [ax.get_title() for ax in fig.axes] == ["bit-match (tokens)", "exact-match (samples)"]


# ---- the command line --------------------------------------------------------------------------


def test_cli_prints_the_report_and_writes_the_plot(records_dir, capsys):
    pytest.importorskip("matplotlib")
    assert main(["report", str(records_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## eval")
    assert out.rstrip().endswith(f"Plot: {records_dir / 'report.png'}")
    assert (records_dir / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert format_report(load_records(records_dir)) in out


def test_cli_options(records_dir, tmp_path, capsys):
    assert main(["report", str(records_dir), "--worst", "1", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "Plot:" not in out and not (records_dir / "report.png").exists()
    assert "Worst 1 of the 4 samples with an error at step 300" in out
    pytest.importorskip("matplotlib")
    png = tmp_path / "elsewhere.png"
    assert report_main([str(records_dir), "--plot", str(png)]) == 0
    assert f"Plot: {png}" in capsys.readouterr().out and png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_cli_errors_are_one_line(tmp_path, capsys, case):
    path = tmp_path / "absent" if case == "missing" else tmp_path
    assert main(["report", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mllm-metrics report: ")
    expected = {"missing": "No records directory", "empty": "no records file"}
    assert expected[case] in lines[0]


def test_cli_fails_when_no_file_can_be_read(tmp_path, capsys):
    (tmp_path / "val_step0000001.jsonl").write_text('{"index": 0,\n')
    assert main(["report", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    first, last = captured.err.strip().splitlines()
    assert first.startswith("mllm-metrics report: skipped ")
    assert "val_step0000001.jsonl, line 1: not valid JSON" in first
    assert "none of the 1 records files" in last and "could be read" in last


def test_cli_argument_errors(records_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(records_dir), "--worst", "-1"])
    assert exit_info.value.code == 2
    assert "--worst" in capsys.readouterr().err


def test_top_level_help_lists_report(capsys):
    assert main(["--help"]) == 0
    assert "report" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "--no-plot" in capsys.readouterr().out


def _python(code: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run ``code`` where the ``blocked`` packages cannot be imported (as if not installed)."""
    package_root = Path(mllm_metrics.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), *sys.path])}
    prelude = (
        "import sys\nimport mllm_metrics\n"  # torchmetrics may import matplotlib: block after
        f"for name in [*sys.modules, *{blocked!r}]:\n"
        f"    if name.split('.')[0] in {blocked!r}:\n"
        "        sys.modules[name] = None\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=120
    )


def test_report_needs_no_framework_and_says_when_matplotlib_is_missing(records_dir, tmp_path):
    blocked = ("lightning", "transformers", "matplotlib")
    main_call = "from mllm_metrics.demo.cli import main; sys.exit(main({argv!r}))"
    # Without --plot the default PNG is skipped with a note, and the report still counts.
    result = _python(main_call.format(argv=["report", str(records_dir)]), blocked)
    assert result.returncode == 0, result.stderr
    assert "## val" in result.stdout and "Plot:" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        "mllm-metrics report: no plot: Drawing the report needs matplotlib, which is not "
        'installed: pip install "mllm-metrics[demo]"'
    ]
    # An explicit --plot that cannot be honoured is an error.
    argv = ["report", str(records_dir), "--plot", str(tmp_path / "x.png")]
    result = _python(main_call.format(argv=argv), blocked)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert 'pip install "mllm-metrics[demo]"' in result.stderr
    # The report module imports no framework at all (matplotlib only inside plot_report).
    code = (
        "before = set(sys.modules)\nimport mllm_metrics.report\n"
        "heavy = ('transformers', 'lightning', 'matplotlib')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))"
    )
    result = _python(code, ())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_records_without_nll_are_read_and_ranked_by_share_then_index(tmp_path):
    # `StreamingMetrics(nll=False)` writes `"nll": null`.
    _write(
        tmp_path,
        "eval_step0000010.jsonl",
        [
            _record(0, None, 4, 4, True, None),
            _record(1, None, 4, 1, False, None),
            _record(2, None, 2, 1, False, None),
        ],
    )
    [file] = load_records(tmp_path)
    summary = summarize(file.records)
    assert summary.overall.bit_match == pytest.approx(6 / 10)
    assert math.isnan(summary.overall.nll)
    text = format_report([file], worst=3)
    worst = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    # Rows of the worst-samples table, after its header: 1/4, then 1/2; index 0 (4/4) is right.
    assert worst[worst.index("index") + 1 :] == ["1", "2"]


def test_worst_samples_order_is_the_same_with_a_nan_nll():
    # A NaN NLL (a row whose logits overflowed) counts as unknown, like a null one, and does not
    # make the order depend on where it sits in the file.
    records = [
        {"index": i, "supervised_tokens": 2, "correct_tokens": 1, "nll": nll}
        for i, nll in enumerate([float("nan"), 9.0, 1.0, None])
    ]
    for shift in range(len(records)):
        order = [r["index"] for r in worst_samples(records[shift:] + records[:shift])]
        assert order == [1, 2, 0, 3]
