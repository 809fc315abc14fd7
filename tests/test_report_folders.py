"""``mllm-metrics report`` on folders as they are found: bad files, two runs, other eval sets.

Every expected value is worked out here from the hand-written records (which sample is right at
which step), not taken from the report's output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mllm_metrics.report import (
    RecordsFile,
    curve_sets,
    format_report,
    group_series,
    load_records,
    report_main,
    scan_records,
)
from mllm_metrics.report.series import WRITE_ORDER_SLACK_S, default_flips, difference, flips


def _record(index, exact, reference=None, supervised=4, group=None, prediction=None):
    record = {
        "index": index,
        "supervised_tokens": supervised,
        "correct_tokens": supervised if exact else supervised - 1,
        "exact": exact,
        "nll": 0.5 if exact else 2.0,
    }
    if group is not None:
        record["group"] = group
    if reference is not None:
        record["reference"] = reference
        record["prediction"] = prediction if prediction is not None else reference
    return record


def _write(directory: Path, name: str, records: list[dict], mtime: float | None = None) -> Path:
    path = directory / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines):
        header = number + 1 < len(lines) and lines[number + 1].startswith("|---")
        if line.startswith("| ") and not header:
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


GOOD = [_record(0, True, "ab"), _record(1, False, "cd")]


# ---- files that cannot be read -----------------------------------------------------------------


def test_a_truncated_file_is_named_and_the_others_are_read(tmp_path):
    _write(tmp_path, "val_step0000100.jsonl", GOOD)
    cut = "".join(json.dumps(record) + "\n" for record in GOOD)[:-20]  # mid second line
    (tmp_path / "val_step0000200.jsonl").write_text(cut)
    _write(tmp_path, "val_step0000300.jsonl", GOOD)
    scan = scan_records(tmp_path)
    assert [f.step for f in scan.files] == [100, 300]
    (bad,) = scan.unread
    assert bad.path.name == "val_step0000200.jsonl" and bad.line == 2
    assert bad.problem.startswith("not valid JSON (")
    assert "it looks truncated" in bad.problem


def test_a_file_that_is_not_utf8_is_named_with_line_and_byte(tmp_path):
    _write(tmp_path, "val_step0000100.jsonl", GOOD)
    line = json.dumps(GOOD[0]).encode()
    (tmp_path / "val_step0000200.jsonl").write_bytes(line + b"\n" + b'{"index": \xff1}\n')
    scan = scan_records(tmp_path)
    (bad,) = scan.unread
    assert bad.path.name == "val_step0000200.jsonl" and bad.line == 2
    # b'{"index": ' is 10 bytes: the 0xff is the 11th.
    assert bad.problem.startswith("not UTF-8 text (byte 0xff at column 11)")
    assert str(bad).startswith(f"{tmp_path / 'val_step0000200.jsonl'}, line 2: not UTF-8")
    with pytest.raises(ValueError, match=r"val_step0000200\.jsonl, line 2: not UTF-8"):
        load_records(tmp_path)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"\x89PNG\r\n", "not UTF-8 text (byte 0x89 at column 1)"),
        (b"garbage", "not valid JSON (Expecting value: column 1)"),
        (b'"a string"', "expected a JSON object (one record), got str"),
        (
            json.dumps({**GOOD[0], "correct_tokens": 5}).encode(),
            "'correct_tokens' 5 and 'supervised_tokens' 4: expected 0 <= correct_tokens <= "
            "supervised_tokens",
        ),
        (json.dumps({**GOOD[0], "supervised_tokens": -1, "correct_tokens": 0}).encode(), "-1"),
        (json.dumps({**GOOD[0], "prediction": 7}).encode(), "'prediction' must be a string"),
        (json.dumps({**GOOD[0], "nll": "high"}).encode(), "'nll' must be a number or null"),
    ],
)
def test_each_kind_of_bad_line_is_named(tmp_path, line, problem):
    (tmp_path / "val_step0000001.jsonl").write_bytes(line + b"\n")
    (bad,) = scan_records(tmp_path).unread
    assert bad.line == 1 and problem in bad.problem


def test_an_index_twice_is_a_bad_file(tmp_path):
    _write(tmp_path, "val_step0000001.jsonl", [GOOD[0], GOOD[1], GOOD[0]])
    (bad,) = scan_records(tmp_path).unread
    assert bad.line == 3 and bad.problem.startswith("index 0 again (also on line 1)")


def test_report_shows_the_good_files_and_names_the_bad_ones(tmp_path, capsys):
    _write(tmp_path, "val_step0000100.jsonl", GOOD)
    (tmp_path / "val_step0000200.jsonl").write_bytes(b"\xff\xfe{}\n")
    (tmp_path / "test_step0000001.jsonl").write_text('{"index": 0, "supervised_tokens": 3')
    assert report_main([str(tmp_path), "--no-plot"]) == 0
    captured = capsys.readouterr()
    unread = _section(captured.out, "Files not read (2)")
    assert "- test_step0000001.jsonl: line 1: not valid JSON" in unread
    assert "- val_step0000200.jsonl: line 1: not UTF-8 text (byte 0xff at column 1)" in unread
    # The good file is reported: 1 of 2 samples right, 7 of 8 tokens.
    assert "| 100 | all | 2 | 0.875 | 0.500 |" in _section(captured.out, "val")
    skipped = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(skipped) == 2
    assert any("test_step0000001.jsonl, line 1: not valid JSON" in line for line in skipped)
    assert any("val_step0000200.jsonl, line 1: not UTF-8" in line for line in skipped)


# ---- two eval sets in one folder ---------------------------------------------------------------

# Eval set A (steps 100 and 300) and eval set B (step 200, another run on other data). Between
# A's steps, index 0 goes right -> wrong and index 2 wrong -> right. Comparing B's step 200 with
# A's step 300 by index would report index 1 right -> wrong, a flip that never happened.
A_100 = [_record(0, True, "00"), _record(1, False, "01"), _record(2, False, "10")]
A_300 = [_record(0, False, "00"), _record(1, False, "01"), _record(2, True, "10")]
B_200 = [_record(0, False, "11"), _record(1, True, "11"), _record(2, True, "00")]


def test_two_eval_sets_are_told_apart_and_never_compared(tmp_path):
    _write(tmp_path, "val_step0000100.jsonl", A_100)
    _write(tmp_path, "val_step0000200.jsonl", B_200)
    _write(tmp_path, "val_step0000300.jsonl", A_300)
    (series,) = group_series(load_records(tmp_path))
    assert [[f.step for f in e.files] for e in series.eval_sets] == [[100, 300], [200]]
    text = _section(format_report(load_records(tmp_path)), "val")
    assert text.count("Warning: these records hold 2 different eval sets") == 1
    # Index 0 is "00" in A and "11" in B: all 3 indexes differ, the first is shown.
    assert (
        "step 200 against step 100: 3 of the 3 indexes hold another sample (index 0: "
        'reference "00" at step 100, "11" at step 200)' in text
    )
    first = text[text.index("### eval set 1 of 2") : text.index("### eval set 2 of 2")]
    second = text[text.index("### eval set 2 of 2") :]
    assert "between step 100 and step 300" in first
    lost = first[first.index("right -> wrong") : first.index("wrong -> right")]
    assert [row[0] for row in _table_rows(lost)] == ["0"]
    assert [row[0] for row in _table_rows(first[first.index("wrong -> right") :])] == ["2"]
    assert "Only one step (step 200): no flips to compare." in second
    assert "between step 200" not in text and "and step 200" not in text


def test_an_eval_set_that_changed_size_is_another_eval_set(tmp_path):
    _write(tmp_path, "val_step0000100.jsonl", A_100)
    _write(tmp_path, "val_step0000200.jsonl", A_300[:2])
    (series,) = group_series(load_records(tmp_path))
    assert len(series.eval_sets) == 2
    before, after = (e.files[0] for e in series.eval_sets)
    assert difference(before, after) == (
        "step 100 holds 3 samples and step 200 holds 2 (index 2 only at step 100)"
    )
    with pytest.raises(ValueError, match="hold different eval sets"):
        flips(before, after)


def test_other_supervised_tokens_or_group_make_another_eval_set():
    def file(step, records):
        return RecordsFile("val", step, "step", None, Path(f"val_step{step:07d}.jsonl"), records)

    base = [_record(0, True, supervised=4), _record(1, True, supervised=6)]
    longer = [_record(0, True, supervised=4), _record(1, True, supervised=7)]
    assert difference(file(1, base), file(2, longer)) == (
        "1 of the 2 indexes hold another sample (index 1: supervised tokens 6 at step 1, 7 at "
        "step 2)"
    )
    grouped = [_record(0, True, supervised=4, group="a"), _record(1, True, supervised=6)]
    assert "index 0: group null at step 1" in difference(file(1, base), file(2, grouped))


def test_without_reference_the_check_says_what_it_could_not_see(tmp_path):
    no_text = [{k: v for k, v in r.items() if k not in ("reference", "prediction")} for r in A_100]
    _write(tmp_path, "val_step0000100.jsonl", no_text)
    _write(tmp_path, "val_step0000200.jsonl", no_text)
    text = format_report(load_records(tmp_path))
    assert "No sample's exact match flipped between step 100 and step 200" in text
    assert "no reference text to compare" in text


# ---- two runs of the same eval set -------------------------------------------------------------


def test_steps_that_restart_are_a_second_run(tmp_path):
    # Run 1 wrote steps 100, 200, 300; run 2, an hour later, wrote steps 100 and 200 again
    # (over run 1's files). Only run 1's step 300 is left of it.
    _write(tmp_path, "val_step0000300.jsonl", A_300, mtime=1_200.0)
    _write(tmp_path, "val_step0000100.jsonl", A_100, mtime=5_000.0)
    _write(tmp_path, "val_step0000200.jsonl", A_100, mtime=5_100.0)
    (series,) = group_series(load_records(tmp_path))
    ((run1, run2),) = [e.runs for e in series.eval_sets]
    assert [f.step for f in run1.files] == [300] and [f.step for f in run2.files] == [100, 200]
    text = format_report(load_records(tmp_path))
    # 5000 - 1200 = 3800 s, 63 minutes.
    assert (
        "run 2 starts at step 100 (val_step0000100.jsonl), written 63 min after step 300 "
        "(val_step0000300.jsonl), so the steps restart" in text
    )
    # Flips: run 2's two steps (identical records: none), not step 200 against step 300.
    assert "No sample's exact match flipped between step 100 and step 200" in text
    assert "the last two evaluations of run 2" in text
    # The metrics table says which run each row is of, run by run.
    rows = [row for row in _table_rows(text) if len(row) > 3 and row[2] == "all"]
    assert [(row[0], row[1]) for row in rows] == [("300", "1"), ("100", "2"), ("200", "2")]


def test_files_copied_in_any_order_are_one_run(tmp_path):
    # A copy writes the files within moments, in any order: no restart.
    slack = WRITE_ORDER_SLACK_S / 4
    _write(tmp_path, "val_step0000300.jsonl", A_300, mtime=1_000.0)
    _write(tmp_path, "val_step0000100.jsonl", A_100, mtime=1_000.0 + slack)
    _write(tmp_path, "val_step0000200.jsonl", A_100, mtime=1_000.0 + 2 * slack)
    (series,) = group_series(load_records(tmp_path))
    assert series.notes == [] and len(series.eval_sets[0].runs) == 1
    # Flips between 200 and 300 (A_100's index 0 right, A_300's wrong...).
    choice = default_flips(series.eval_sets[0])
    assert [r["index"] for r in choice.flips.lost] == [0]
    assert [r["index"] for r in choice.flips.gained] == [2]


def test_a_step_written_twice_is_two_runs(tmp_path):
    _write(tmp_path, "val_step0000100.jsonl", A_100, mtime=100.0)
    _write(tmp_path, "val_step0000300.jsonl", A_300, mtime=300.0)
    _write(tmp_path, "val_step300.jsonl", A_100, mtime=300.5)  # step 300 again
    (series,) = group_series(load_records(tmp_path))
    (eval_set,) = series.eval_sets
    assert [[f.path.name for f in run.files] for run in eval_set.runs] == [
        ["val_step0000100.jsonl", "val_step0000300.jsonl"],
        ["val_step300.jsonl"],
    ]
    assert "run 2 starts with step 300 again (val_step300.jsonl, after " in series.notes[0]
    # Run 2 has one evaluation: the flips are run 1's (100 -> 300: index 0 lost, 2 gained).
    choice = default_flips(eval_set)
    assert (choice.flips.before.step, choice.flips.after.step) == (100, 300)
    assert [r["index"] for r in choice.flips.lost] == [0]
    assert [r["index"] for r in choice.flips.gained] == [2]
    assert "run 2, which wrote last, has a single evaluation (step 300)" in choice.note
    assert eval_set.same_run(eval_set.runs[0].files[1], eval_set.runs[1].files[0]) is not None


def test_a_second_evaluation_at_the_same_step_is_read_and_kept_apart(tmp_path):
    # The writer names a second evaluation at one step `-2` (e.g. validate() after fit()).
    _write(tmp_path, "val_step0000100.jsonl", A_100, mtime=100.0)
    _write(tmp_path, "val_step0000300.jsonl", A_300, mtime=300.0)
    _write(tmp_path, "val_step0000300-2.jsonl", A_100, mtime=400.0)
    _write(tmp_path, "val_step0000300_dl1-2.jsonl", A_100, mtime=400.0)
    files = load_records(tmp_path)
    got = [(f.step, f.dataloader, f.repeat, f.moment) for f in files]
    assert got == [
        (100, None, 1, "step 100"),
        (300, None, 1, "step 300"),
        (300, None, 2, "step 300 #2"),
        (300, 1, 2, "step 300 #2"),
    ]
    text = _section(format_report(files), "val")
    assert "run 2 starts with step 300 again (val_step0000300-2.jsonl, after " in text
    assert "validate() after fit()" in text
    # The worst samples are of the latest evaluation (A_100 again: index 1 and 2 wrong).
    assert "with an error at step 300 #2" in text
    # The flips are run 1's, 100 -> 300, not 300 -> 300 #2.
    assert "flipped between step 100 and step 300 (" in text


def test_report_warns_on_stderr(tmp_path, capsys):
    _write(tmp_path, "val_step0000100.jsonl", A_100)
    _write(tmp_path, "val_step0000200.jsonl", B_200)
    assert report_main([str(tmp_path), "--no-plot"]) == 0
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("mllm-metrics report: warning: val: these records hold 2 different")


def test_curves_are_drawn_per_eval_set_and_run(tmp_path):
    _write(tmp_path, "val_step0000100.jsonl", A_100)
    _write(tmp_path, "val_step0000200.jsonl", B_200)
    _write(tmp_path, "val_step0000300.jsonl", A_300)
    sets = [(name, [f.step for f in files]) for name, files in curve_sets(load_records(tmp_path))]
    assert sets == [("val set 1", [100, 300]), ("val set 2", [200])]


def test_a_copy_that_reorders_the_times_keeps_the_runs_apart(tmp_path):
    # Run 1 wrote steps 100 and 200 (A_100, then A_300); run 2 wrote them again as `-2` files
    # (A_300, then A_100). A plain `cp`/`scp` then set the times in name order, where `-2`
    # sorts before `.`: 100-2, 100, 200-2, 200. The suffixes, not the times, say who wrote what.
    for offset, (name, records) in enumerate(
        (
            ("val_step0000100-2.jsonl", A_300),
            ("val_step0000100.jsonl", A_100),
            ("val_step0000200-2.jsonl", A_100),
            ("val_step0000200.jsonl", A_300),
        )
    ):
        _write(tmp_path, name, records, mtime=1_000.0 + offset * 0.1)
    (series,) = group_series(load_records(tmp_path))
    (eval_set,) = series.eval_sets
    assert [[f.path.name for f in run.files] for run in eval_set.runs] == [
        ["val_step0000100.jsonl", "val_step0000200.jsonl"],
        ["val_step0000100-2.jsonl", "val_step0000200-2.jsonl"],
    ]
    # The flips are run 2's own (A_300 -> A_100: index 0 gained, index 2 lost).
    choice = default_flips(eval_set)
    assert (choice.flips.before.path.name, choice.flips.after.path.name) == (
        "val_step0000100-2.jsonl",
        "val_step0000200-2.jsonl",
    )
    assert [r["index"] for r in choice.flips.lost] == [2]
    assert [r["index"] for r in choice.flips.gained] == [0]
    # What the times no longer say is said: a step written once cannot be told apart.
    assert "the files' modification times contradict their -N suffixes" in series.notes[0]
