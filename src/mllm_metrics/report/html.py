"""``mllm-metrics report PATH --html FILE``: the report as one self-contained web page.

The page needs no network and no other file: the style sheet, the script and the charts (SVG
drawn by :mod:`mllm_metrics.report.svg`) are inline, and a Content-Security-Policy forbids any
request. It shows, per series (stage and dataloader) and eval set: warnings (files not read,
several eval sets or runs in one folder), the curves of bit-match, exact-match, free-running
exact-match and NLL per step and group, the metrics of the last evaluation, a table of every
sample of the evaluation chosen (sortable by any column, filtered by group, by right / wrong,
by a text search; shown page by page), with the characters of each prediction marked where they
differ from the reference, and the flips between two evaluations of the same eval set and run.

The samples are embedded as JSON, column by column, and rendered by the script, so an eval set
of thousands of samples makes a page of a few MB that opens at once. Every text that comes from
the records is escaped here or set as text by the script.

Only the standard library is imported here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from mllm_metrics.report.assets import SCRIPT, STYLE
from mllm_metrics.report.metrics import Metrics, Summary, summarize
from mllm_metrics.report.records import RecordsFile, RecordsScan, UnreadFile
from mllm_metrics.report.series import (
    EvalSet,
    Series,
    comparable_text,
    default_flips,
    group_series,
)
from mllm_metrics.report.svg import PALETTE, Line, line_chart

__all__ = ["format_html", "page_data", "write_html"]

_CHARTS = (
    ("bit_match", "bit-match (tokens)", (0.0, 1.0)),
    ("exact_match", "exact-match (samples)", (0.0, 1.0)),
    ("gen_exact_match", "generated exact-match", (0.0, 1.0)),
    ("nll", "NLL per supervised token", None),
)


def _number(value: float | None) -> float | str | None:
    """A JSON value for a number: ``"NaN"``/``"Infinity"`` as strings, which JSON cannot hold."""
    if value is None or not isinstance(value, float) or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _column(records: Sequence[Mapping[str, Any]], key: str) -> list[Any] | None:
    """One field of every record, or None when no record has it."""
    if all(record.get(key) is None for record in records):
        return None
    return [record.get(key) for record in records]


def _series_name(series: Series, eval_set: EvalSet) -> str:
    name = series.title
    return name + (
        f" \u00b7 eval set {eval_set.number} of {eval_set.of}" if eval_set.of > 1 else ""
    )


def page_data(series_list: Sequence[Series]) -> dict[str, Any]:
    """The data the page's script renders: per eval set, its samples column by column.

    Args:
        series_list: what :func:`~mllm_metrics.report.series.group_series` returned.

    Returns:
        ``{"evalSets": [...], "start": [eval set, evaluation]}``: per eval set its name, what
        makes its evaluations comparable (``checked``), the samples' ``index``, ``sup``
        (supervised tokens), ``group`` (positions in ``groups``, -1 for none) and ``ref``
        (null without text), and per evaluation its ``label``, ``run``, ``file``, ``cor``
        (correct tokens), ``exact``, ``nll``, ``genExact``, ``pred``, ``gen`` (null when no
        record has the field); ``flips``, the default pair of evaluations (positions), or null
        with ``flipsNote`` saying why. The page starts on the last evaluation of the first eval
        set.

    Examples:
        >>> from pathlib import Path
        >>> from mllm_metrics.report.series import group_series
        >>> records = [{"index": 0, "supervised_tokens": 2, "correct_tokens": 1,
        ...             "exact": False, "nll": 1.5, "group": "a"}]
        >>> file = RecordsFile("val", 10, "step", None, Path("val_step0000010.jsonl"), records)
        >>> data = page_data(group_series([file]))
        >>> s = data["evalSets"][0]
        >>> s["index"], s["sup"], s["group"], s["groups"], s["ref"]
        ([0], [2], [0], ['a'], None)
        >>> e = s["evaluations"][0]
        >>> e["label"], e["cor"], e["exact"], e["nll"], e["pred"], s["flips"]
        ('step 10', [1], [False], [1.5], None, None)
    """
    eval_sets = []
    for series in series_list:
        for eval_set in series.eval_sets:
            files = eval_set.files
            first = files[0].records
            groups = sorted({str(r["group"]) for r in first if r.get("group") is not None})
            position = {name: number for number, name in enumerate(groups)}
            choice = default_flips(eval_set)
            flips = None
            if choice.flips is not None:
                flips = [
                    next(i for i, f in enumerate(files) if f is choice.flips.before),
                    next(i for i, f in enumerate(files) if f is choice.flips.after),
                ]
            eval_sets.append(
                {
                    "name": _series_name(series, eval_set),
                    "runs": len(eval_set.runs),
                    "checked": comparable_text(eval_set, len(first)),
                    "index": [r["index"] for r in first],
                    "sup": [r["supervised_tokens"] for r in first],
                    "group": [
                        -1 if r.get("group") is None else position[str(r["group"])] for r in first
                    ],
                    "groups": groups,
                    "ref": _column(first, "reference"),
                    "evaluations": [
                        {
                            "label": file.moment,
                            "run": eval_set.run_of(file).number,
                            "file": file.path.name,
                            "cor": [r["correct_tokens"] for r in file.records],
                            "exact": [r["exact"] for r in file.records],
                            "nll": None
                            if _column(file.records, "nll") is None
                            else [_number(r["nll"]) for r in file.records],
                            "genExact": _column(file.records, "gen_exact"),
                            "pred": _column(file.records, "prediction"),
                            "gen": _column(file.records, "generated"),
                        }
                        for file in files
                    ],
                    "flips": flips,
                    "flipsNote": choice.note,
                }
            )
    start = [0, len(eval_sets[0]["evaluations"]) - 1] if eval_sets else [0, 0]
    return {"evalSets": eval_sets, "start": start}


def _json_for_script(data: Any) -> str:
    """JSON that is safe inside ``<script>``: no ``<``, ``>`` or ``&`` can end the element."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _fmt(value: float) -> str:
    return "\u2013" if math.isnan(value) else f"{value:.3f}"


def _charts(eval_set: EvalSet) -> str:
    """The legend and the chart panels of one eval set: a line per group (and all) and run."""
    runs = eval_set.runs
    summaries = [[(file, summarize(file.records)) for file in run.files] for run in runs]
    names = ["all", *sorted({g for run in summaries for _, s in run for g in s.groups})]
    colors = {name: PALETTE[n % len(PALETTE)] for n, name in enumerate(names)}
    kind = eval_set.last.kind
    x_label = "step" if kind == "step" else "evaluation call"
    panels = []
    for attribute, title, y_range in _CHARTS:
        lines = []
        for run, points in zip(runs, summaries):
            for name in [*names[1:], names[0]]:  # "all" last: drawn on top
                values = [
                    (file.step, _metric(summary, name, attribute)) for file, summary in points
                ]
                if all(math.isnan(y) for _, y in values):
                    continue
                prefix = f"run {run.number} \u00b7 " if len(runs) > 1 else ""
                hints = [
                    f"{prefix}{name}, {file.moment}: {_fmt(y)}"
                    + _tokens_hint(summary, name, attribute)
                    for (file, summary), (_, y) in zip(points, values)
                ]
                lines.append(
                    Line(
                        prefix + name,
                        values,
                        colors[name],
                        dashed=run is not runs[-1],
                        bold=name == "all",
                        hints=hints,
                    )
                )
        if lines:
            panels.append(
                line_chart(
                    lines, title=title, x_label=x_label, y_range=y_range, width=280, height=210
                )
            )
    legend = []
    for name in names:
        swatch = (
            f'<svg width="22" height="10" aria-hidden="true"><line x1="1" x2="21" y1="5" y2="5" '
            f'stroke="{colors[name]}" stroke-width="{3 if name == "all" else 2}"/></svg>'
        )
        legend.append(f"<span>{swatch}{escape(name)}</span>")
    if len(runs) > 1:
        legend.append(f"<span>dashed: runs before run {runs[-1].number}</span>")
    return f'<div class="legend">{"".join(legend)}</div><div class="charts">{"".join(panels)}</div>'


def _metrics_of(summary: Summary, name: str) -> Metrics | None:
    """The metrics of a group, or of every sample for ``"all"``; None for a group without any."""
    return summary.overall if name == "all" else summary.groups.get(name)


def _metric(summary: Summary, name: str, attribute: str) -> float:
    metrics = _metrics_of(summary, name)
    return math.nan if metrics is None else float(getattr(metrics, attribute))


def _tokens_hint(summary: Summary, name: str, attribute: str) -> str:
    metrics = _metrics_of(summary, name)
    if attribute != "bit_match" or metrics is None:
        return ""
    return f" ({metrics.correct_tokens}/{metrics.supervised_tokens} tokens)"


def _summary_table(file: RecordsFile) -> str:
    summary = summarize(file.records)
    with_gen = any(r.get("gen_exact") is not None for r in file.records)
    head = ["group", "samples", "bit_match", "exact_match", "nll"]
    head += ["gen_exact_match"] if with_gen else []
    cells = "".join(
        f"<th{'' if n == 0 else ' class=num'}>{escape(h)}</th>" for n, h in enumerate(head)
    )
    rows = [f"<tr>{cells}</tr>"]
    for name, metrics in summary.rows():
        values = [str(metrics.samples), _fmt(metrics.bit_match), _fmt(metrics.exact_match)]
        values += [_fmt(metrics.nll)] + ([_fmt(metrics.gen_exact_match)] if with_gen else [])
        tds = "".join(f'<td class="num">{v}</td>' for v in values)
        rows.append(f"<tr><td>{escape(name)}</td>{tds}</tr>")
    return f'<table class="summary">{"".join(rows)}</table>'


def _warnings(unread: Sequence[UnreadFile], series_list: Sequence[Series]) -> str:
    parts = []
    if unread:
        items = "".join(
            f"<li><code>{escape(file.path.name)}</code>: {escape(file.reason)}</li>"
            for file in unread
        )
        parts.append(
            f'<div class="warn" id="unread"><strong>{len(unread)} records file'
            f"{'' if len(unread) == 1 else 's'} could not be read</strong> and "
            f"{'is' if len(unread) == 1 else 'are'} left out:<ul>{items}</ul></div>"
        )
    for series in series_list:
        for note in series.notes:
            parts.append(
                f'<div class="warn"><strong>{escape(series.title)}</strong>: {escape(note)}</div>'
            )
    return "".join(parts)


def _series_sections(series_list: Sequence[Series]) -> str:
    parts = []
    for series in series_list:
        parts.append(f"<h2>{escape(series.title)}</h2>")
        for eval_set in series.eval_sets:
            if eval_set.of > 1:
                parts.append(f"<h3>eval set {eval_set.number} of {eval_set.of}</h3>")
            last = eval_set.last
            parts.append(_charts(eval_set))
            parts.append(
                f'<p class="muted">At {escape(last.moment)} (<code>{escape(last.path.name)}'
                "</code>), the last evaluation"
                + (" of the run that wrote last" if len(eval_set.runs) > 1 else "")
                + ":</p>"
            )
            parts.append(_summary_table(last))
    return "".join(parts)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>mllm-metrics report</h1>
<div class="sub">{subtitle}</div>
{warnings}
{sections}
<h2 id="samples-title">Samples</h2>
<p class="muted">Every sample of one evaluation. Click a column to sort (again to reverse);
samples without a value sort last.</p>
<p class="marks"><strong>Marks are character-level on the decoded text</strong>: each prediction
is compared with its reference position by position, character by character (not token by
token: one character dropped or added early shifts everything after it).
<mark class="bad">x</mark> wrong character (hover: the expected one) ·
<mark class="missing">x</mark> reference character missing ·
<mark class="extra">x</mark> extra character, past the reference's end ·
marked spaces and line breaks show as ␣ and ↵.</p>
<div class="controls">
<label>evaluation <select id="evaluation"></select></label>
<span class="muted mono" id="eval-file"></span>
</div>
<div class="controls">
<label>group <select id="group"></select></label>
<label>show <select id="status">
<option value="all">all samples</option>
<option value="wrong">wrong (exact false)</option>
<option value="right">right (exact true)</option>
<option value="none">no supervised token</option>
<option value="gen-wrong">generated wrong</option>
<option value="gen-differs">generated \u2260 teacher-forced</option>
</select></label>
<label>search <input id="search" type="search" placeholder="text, or an index"></label>
<label>rows per page <select id="page-size">
<option value="25">25</option><option value="100" selected>100</option>
<option value="500">500</option></select></label>
</div>
<div class="count" id="count"></div>
<div class="scroll"><table class="samples" id="samples"><thead></thead><tbody></tbody></table></div>
<div class="pager"><button type="button" id="prev">\u2190 previous</button>
<span id="page"></span><button type="button" id="next">next \u2192</button></div>
<h2>Flips</h2>
<p class="muted">Samples whose exact match changed between two evaluations of the eval set of
the evaluation above (and of one run).</p>
<div class="controls">
<label>from <select id="flip-from"></select></label>
<label>to <select id="flip-to"></select></label>
<span class="muted" id="flip-default"></span>
</div>
<p id="flip-note"></p>
<div class="flip-counts" id="flip-counts"></div>
<h3 id="lost-title"></h3>
<div class="scroll"><table class="samples" id="lost"><thead></thead><tbody></tbody></table></div>
<h3 id="gained-title"></h3>
<div class="scroll"><table class="samples" id="gained"><thead></thead><tbody></tbody></table></div>
<footer>Written by mllm-metrics report from {source}. Ratios are ratios of sums, as the
streaming metrics compute them (bit-match and NLL weigh tokens, exact-match samples).</footer>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""


def format_html(
    files: Sequence[RecordsFile], unread: Sequence[UnreadFile] = (), source: str = ""
) -> str:
    """The report of some records files as one self-contained HTML page.

    Args:
        files: what :func:`~mllm_metrics.report.records.load_records` returned.
        unread: the files that could not be read, listed in a warning at the top.
        source: where the records were read (shown in the page).

    Returns:
        The page.

    Examples:
        >>> from pathlib import Path
        >>> records = [{"index": 0, "supervised_tokens": 2, "correct_tokens": 1,
        ...             "exact": False, "nll": 1.5, "prediction": "<b>", "reference": "<i>"}]
        >>> file = RecordsFile("val", 10, "step", None, Path("val_step0000010.jsonl"), records)
        >>> page = format_html([file], source="records")
        >>> page.startswith("<!DOCTYPE html>"), "<b>" in page, "\\\\u003cb\\\\u003e" in page
        (True, False, True)
    """
    series_list = group_series(files)
    evaluations = sum(len(eval_set.files) for s in series_list for eval_set in s.eval_sets)
    subtitle = f"{evaluations} evaluation{'' if evaluations == 1 else 's'}"
    subtitle += f" in {len(series_list)} series" if len(series_list) != 1 else ""
    if source:
        subtitle += f" read from <code>{escape(source)}</code>"
    csp = (
        f"default-src 'none'; style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SCRIPT)}; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    return _PAGE.format(
        csp=csp,
        title=escape(f"mllm-metrics report: {source}" if source else "mllm-metrics report"),
        style=STYLE,
        subtitle=subtitle,
        warnings=_warnings(unread, series_list),
        sections=_series_sections(series_list),
        source=f"<code>{escape(source)}</code>" if source else "records",
        data=_json_for_script(page_data(series_list)),
        script=SCRIPT,
    )


def write_html(scan: RecordsScan | Sequence[RecordsFile], out: str | Path) -> Path:
    """Write the HTML report of a scanned records directory (or of some records files).

    Args:
        scan: what :func:`~mllm_metrics.report.records.scan_records` returned (its unread
            files are listed in the page), or records files.
        out: the HTML file to write (its directory is created when missing).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: when the file cannot be written.
    """
    if isinstance(scan, RecordsScan):
        page = format_html(scan.files, scan.unread, source=str(scan.directory))
    else:
        page = format_html(scan)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
