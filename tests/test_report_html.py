"""The HTML report as text: self-contained, escaped, its data and its charts (no browser).

The page's behaviour in a browser is tested in test_report_browser.py; here the page's text
and data are checked against the records the tests wrote, and the charts against geometry.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mllm_metrics.report import RecordsFile, group_series, report_main, scan_records
from mllm_metrics.report.html import format_html, page_data, write_html
from mllm_metrics.report.svg import Line, line_chart, nice_ticks

NASTY = '</script><script>alert(1)</script><!-- & "quoted" \u2028 é'
GROUP = "<img src=x onerror=alert(1)>"


def _record(index, exact, supervised=4, **extra):
    correct = supervised if exact or supervised == 0 else supervised - 1
    return {
        "index": index,
        "supervised_tokens": supervised,
        "correct_tokens": correct,
        "exact": exact,
        "nll": 0.25 if exact else 2.0,
        **extra,
    }


def _file(step, records, name=None):
    name = name or f"val_step{step:07d}.jsonl"
    return RecordsFile("val", step, "step", None, Path(name), records)


STEP_1 = [
    _record(0, True, group="a", prediction="01", reference="01"),
    _record(1, False, group=GROUP, prediction=NASTY, reference="10"),
    _record(2, None, supervised=0, group="a", prediction="", reference=""),
]
STEP_2 = [
    _record(0, False, group="a", prediction="00", reference="01"),
    _record(1, True, group=GROUP, prediction="10", reference="10"),
    _record(2, None, supervised=0, group="a", prediction="", reference=""),
]


def _data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page)
    assert match, "no data element"
    return json.loads(match.group(1))


def test_page_needs_nothing_from_outside():
    page = format_html([_file(1, STEP_1), _file(2, STEP_2)])
    # No resource to load: no src/href attribute, no CSS url() or @import, no scheme.
    # (The group name holds "src=" as text, escaped in the markup or in a JSON string.)
    data_text = re.search(r'id="report-data">(.*?)</script>', page).group(1)
    markup = page.replace(data_text, "").replace(html.escape(GROUP), "")
    assert not re.search(r"\b(?:src|href|action|srcset)\s*=", markup)
    for needle in ("url(", "@import", "@font-face", "http:", "https:", "//cdn", "fetch("):
        assert needle not in page, needle
    # A Content-Security-Policy that forbids any request, and allows only this page's own
    # style sheet and script, by their hashes.
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert csp.startswith("default-src 'none';")
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    for text, directive in ((style, "style-src"), (script, "script-src")):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp
    assert page.count("<script") == 2  # the data (not run) and the script


def test_record_text_cannot_become_markup():
    page = format_html([_file(1, STEP_1), _file(2, STEP_2)])
    # The data element holds no "<": neither </script> nor <!-- can end or bend it.
    data_text = re.search(r'id="report-data">(.*?)</script>', page).group(1)
    assert "<" not in data_text and ">" not in data_text
    assert "<script>alert" not in page and GROUP not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # the legend and the summary table
    # And the data reads back exactly.
    evaluations = _data(page)["evalSets"][0]["evaluations"]
    assert evaluations[0]["pred"][1] == NASTY


def test_page_data_holds_the_records_column_by_column():
    files = [_file(1, STEP_1), _file(2, STEP_2)]
    data = page_data(group_series(files))
    assert data["start"] == [0, 1]  # the last evaluation
    (s,) = data["evalSets"]
    assert s["name"] == "val" and s["runs"] == 1
    assert s["index"] == [0, 1, 2] and s["sup"] == [4, 4, 0]
    # Groups sorted by name ("<" sorts before "a"), each sample by its position.
    assert s["groups"] == [GROUP, "a"] and s["group"] == [1, 0, 1]
    assert s["ref"] == ["01", "10", ""]
    first, second = s["evaluations"]
    assert (first["label"], first["file"], first["run"]) == ("step 1", "val_step0000001.jsonl", 1)
    assert first["cor"] == [4, 3, 0] and first["exact"] == [True, False, None]
    assert second["cor"] == [3, 4, 0] and second["exact"] == [False, True, None]
    assert first["nll"] == [0.25, 2.0, 2.0]
    assert first["pred"] == ["01", NASTY, ""] and first["gen"] is None
    assert first["genExact"] is None
    assert s["flips"] == [0, 1] and s["flipsNote"] == ""


def test_numbers_json_cannot_hold_are_spelled_out():
    records = [
        _record(0, False, nll=float("nan")),
        _record(1, False, nll=float("inf")),
        _record(2, True, nll=None),
    ]
    (evaluation,) = page_data(group_series([_file(1, records)]))["evalSets"][0]["evaluations"]
    assert evaluation["nll"] == ["NaN", "Infinity", None]
    no_nll = [_record(0, True, nll=None)]
    (evaluation,) = page_data(group_series([_file(1, no_nll)]))["evalSets"][0]["evaluations"]
    assert evaluation["nll"] is None


def test_charts_and_summary_of_the_last_evaluation():
    page = format_html([_file(1, STEP_1), _file(2, STEP_2)])
    # No gen_exact in the records: bit-match, exact-match and NLL only.
    titles = re.findall(r'<svg class="chart"[^>]*aria-label="([^"]+)"', page)
    assert titles == ["bit-match (tokens)", "exact-match (samples)", "NLL per supervised token"]
    # Step 2: 3 + 4 of 8 tokens, 1 of 2 exact, NLL (2.0 + 0.25 + 2.0) / 8.
    summary = re.search(r'<table class="summary">(.*?)</table>', page).group(1)
    assert '<tr><td>all</td><td class="num">3</td><td class="num">0.875</td>' in summary
    assert f'<td class="num">0.500</td><td class="num">{4.25 / 8:.3f}</td>' in summary


def test_the_page_lists_unread_files_and_warnings(tmp_path):
    (tmp_path / "val_step0000001.jsonl").write_text(json.dumps(_record(0, True)) + "\n")
    (tmp_path / "val_step0000002.jsonl").write_bytes(b"\xff\n")
    (tmp_path / "val_step0000003.jsonl").write_text(
        json.dumps(_record(0, True)) + "\n" + json.dumps(_record(1, True)) + "\n"
    )
    page = write_html(scan_records(tmp_path), tmp_path / "out" / "page.html").read_text()
    assert (
        "<li><code>val_step0000002.jsonl</code>: line 1: not UTF-8 text (byte 0xff at column 1)"
        in page
    )
    assert "1 records file could not be read" in page
    # Step 3 holds 2 samples, step 1 one: two eval sets, said, and reported apart.
    assert "these records hold 2 different eval sets" in page
    data = _data(page)
    names = [s["name"] for s in data["evalSets"]]
    assert names == ["val \u00b7 eval set 1 of 2", "val \u00b7 eval set 2 of 2"]


def test_cli_writes_the_page(tmp_path, capsys):
    (tmp_path / "val_step0000001.jsonl").write_text(json.dumps(_record(0, True)) + "\n")
    out = tmp_path / "sub" / "report.html"
    assert report_main([str(tmp_path), "--no-plot", "--html", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"HTML: {out}")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_cli_says_when_the_page_cannot_be_written(tmp_path, capsys):
    (tmp_path / "val_step0000001.jsonl").write_text(json.dumps(_record(0, True)) + "\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert report_main([str(tmp_path), "--no-plot", "--html", str(blocker / "x.html")]) == 1
    err = capsys.readouterr().err
    assert "cannot write the page" in err and "x.html" in err


# ---- the charts --------------------------------------------------------------------------------


def test_nice_ticks():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 1000) == [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
    # Range 0.13 / 4 = 0.0325 per interval: the next nice step is 0.05.
    assert nice_ticks(0.02, 0.15, 4) == [0.05, 0.1, 0.15]
    assert nice_ticks(7, 7) == [7.0, 7.2, 7.4, 7.6, 7.8, 8.0]  # widened to [7, 8]


def _points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def test_chart_points_are_where_their_values_say():
    line = Line("all", [(100, 0.25), (200, 0.5), (400, 1.0)], "#000")
    svg = ET.fromstring(line_chart([line], title="t", x_label="step", y_range=(0, 1)))
    (polyline,) = svg.iter("polyline")
    (x1, y1), (x2, y2), (x3, y3) = _points(polyline)
    # x is linear in the step: 200 is a third of the way from 100 to 400.
    assert (x2 - x1) / (x3 - x1) == pytest.approx(1 / 3, abs=0.01)
    # y is linear in the value, up is more: 0.5 is a third of the way from 0.25 to 1.0.
    assert y1 > y2 > y3
    assert (y1 - y2) / (y1 - y3) == pytest.approx(1 / 3, abs=0.01)
    # y = 0 would sit on the x axis line, 1.0 at the top of the plot area.
    axis_y = max(float(el.get("y1")) for el in svg.iter("line") if el.get("class") == "axis")
    assert (axis_y - y1) / (axis_y - y3) == pytest.approx(0.25, abs=0.01)


def test_a_missing_value_breaks_the_line_and_text_is_escaped():
    line = Line("<b>", [(1, 0.1), (2, math.nan), (3, 0.3), (4, 0.4)], "#000", hints=["a"] * 4)
    text = line_chart([line], title="<title>", x_label="x&y")
    assert "<b>" not in text and "&lt;b&gt;" in text and "&lt;title&gt;" in text
    svg = ET.fromstring(text)
    assert [len(_points(p)) for p in svg.iter("polyline")] == [1, 2]
    assert len(list(svg.iter("circle"))) == 3  # none for the missing value
