"""``mllm-metrics report PATH``: read per-sample records back, as tables, worst samples and flips.

An evaluation with ``records_dir`` set writes one JSON Lines file per evaluation, one line per
sample in the order of the eval set::

    {"index": 0, "supervised_tokens": 9, "correct_tokens": 7, "exact": false, "nll": 3.21,
     "group": "few", "prediction": "0101", "reference": "0111"}

named ``{stage}_step{global_step:07d}.jsonl`` (``_dl{N}`` before the suffix with several
dataloaders; ``_call{N}`` instead of ``_step{N}`` when the step is unknown). The aggregates
are recomputed from the sums, as the metrics do (tokens weigh, not samples), so the report
agrees with the logged ``bit_match`` and ``exact_match``, and it adds what a scalar cannot say:
which samples are worst, and which changed their mind between the last two evaluations.

Only the standard library is imported here; :func:`plot_report` imports matplotlib when called.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Metrics",
    "RecordsFile",
    "Summary",
    "format_report",
    "load_records",
    "plot_report",
    "report_main",
    "summarize",
]

_DEMO_EXTRA = 'pip install "mllm-metrics[demo]"'
# The stage is lazy so that `my_eval_step0000040` gives stage `my_eval`.
_NAME = re.compile(r"^(?P<stage>.+?)_(?P<kind>step|call)(?P<number>\d+)(?:_dl(?P<dl>\d+))?\.jsonl$")
_REQUIRED = ("index", "supervised_tokens", "correct_tokens", "exact", "nll")
# Decoded text may be long or span lines: one table cell shows at most this many characters.
_MAX_TEXT = 60


@dataclass
class RecordsFile:
    """One records file: the evaluation it comes from and its samples.

    Attributes:
        stage: the prefix of the file name (``val``, ``test``, ``eval``...).
        step: the global step, or the evaluation's call counter when ``kind == "call"``.
        kind: ``"step"``, or ``"call"`` when the writer did not know the step.
        dataloader: the ``N`` of ``_dl{N}``; None without the suffix.
        path: where it was read.
        records: one dict per line, as written.
    """

    stage: str
    step: int
    kind: str
    dataloader: int | None
    path: Path
    records: list[dict[str, Any]] = field(repr=False)

    @property
    def label(self) -> str:
        """``"300"`` for a step, ``"call 3"`` for a call counter."""
        return str(self.step) if self.kind == "step" else f"call {self.step}"

    @property
    def moment(self) -> str:
        """``"step 300"``, or ``"call 3"`` when the step was unknown."""
        return f"step {self.step}" if self.kind == "step" else self.label

    @property
    def series(self) -> tuple[str, int | None, str]:
        """The files whose steps follow each other: same stage, dataloader and kind."""
        return (self.stage, self.dataloader, self.kind)


@dataclass(frozen=True)
class Metrics:
    """The aggregates of a set of samples; a ratio with nothing to count is ``nan``.

    Attributes:
        samples: how many samples (for ``macro``: the samples of the groups averaged).
        bit_match: correct tokens over supervised tokens.
        exact_match: samples with ``exact`` true over samples with ``exact`` not null.
        nll: summed NLL over supervised tokens (the mean token NLL, as ``val/loss``).
        gen_exact_match: the same as ``exact_match`` for ``gen_exact``; nan when absent.
    """

    samples: int
    bit_match: float
    exact_match: float
    nll: float
    gen_exact_match: float = math.nan


@dataclass(frozen=True)
class Summary:
    """The aggregates of one records file: overall, per group and the macro average.

    Attributes:
        overall: every sample (``"all"`` in the tables).
        groups: per ``group`` value, sorted by name; empty when no record has a group.
        macro: per metric, the mean over the groups where it is defined; None without groups.
    """

    overall: Metrics
    groups: dict[str, Metrics]
    macro: Metrics | None

    def rows(self) -> list[tuple[str, Metrics]]:
        """``("all", ...)``, then each group, then ``("macro", ...)`` when there are groups."""
        rows = [("all", self.overall), *self.groups.items()]
        return rows if self.macro is None else [*rows, ("macro", self.macro)]


# ---- reading -----------------------------------------------------------------------------------


def load_records(path: str | Path) -> list[RecordsFile]:
    """Read every records file in the directory ``path``; other files are ignored.

    Args:
        path: the ``records_dir`` of an evaluation.

    Returns:
        The files sorted by stage, dataloader (none first) and step; empty when there are none.

    Raises:
        FileNotFoundError: when ``path`` is not a directory.
        ValueError: on a line that is not a JSON object with the required keys
            (``index``, ``supervised_tokens``, ``correct_tokens``, ``exact``, ``nll``);
            the message names the file and the line.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = Path(tmp, "val_step0000300_dl1.jsonl").write_text(
        ...         '{"index": 0, "supervised_tokens": 4, "correct_tokens": 3, '
        ...         '"exact": false, "nll": 1.5}\\n'
        ...     )
        ...     [(f.stage, f.step, f.kind, f.dataloader, len(f.records)) for f in load_records(tmp)]
        [('val', 300, 'step', 1, 1)]
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"No records directory at {str(directory)!r}.")
    files = []
    for file in directory.iterdir():
        match = _NAME.match(file.name)
        if match is None or not file.is_file():
            continue
        dataloader = match["dl"]
        files.append(
            RecordsFile(
                stage=match["stage"],
                step=int(match["number"]),
                kind=match["kind"],
                dataloader=None if dataloader is None else int(dataloader),
                path=file,
                records=_read_lines(file),
            )
        )
    files.sort(key=lambda f: (f.stage, _dataloader_key(f.dataloader), f.kind, f.step, f.path.name))
    return files


def _dataloader_key(dataloader: int | None) -> int:
    return -1 if dataloader is None else dataloader


def _read_lines(file: Path) -> list[dict[str, Any]]:
    records = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():  # a trailing newline, or a blank line between records
                continue
            where = f"{file}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
            _check_record(record, where)
            records.append(record)
    records.sort(key=lambda record: record["index"])
    return records


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise ValueError(f"{where}: the record has no {', '.join(map(repr, missing))}.")
    for key in ("index", "supervised_tokens", "correct_tokens"):
        if not _is_int(record[key]):
            raise ValueError(f"{where}: {key!r} must be an integer, got {record[key]!r}.")
    for key in ("exact", "gen_exact"):
        if record.get(key) is not None and not isinstance(record[key], bool):
            raise ValueError(f"{where}: {key!r} must be true, false or null, got {record[key]!r}.")
    nll = record["nll"]  # null when the evaluation did not compute it (`nll=False`)
    if nll is not None and (not isinstance(nll, (int, float)) or isinstance(nll, bool)):
        raise ValueError(f"{where}: 'nll' must be a number or null, got {nll!r}.")


# ---- aggregating -------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _share_true(records: Sequence[Mapping[str, Any]], key: str) -> float:
    counted = [record[key] for record in records if record.get(key) is not None]
    return _ratio(sum(counted), len(counted))


def _metrics(records: Sequence[Mapping[str, Any]]) -> Metrics:
    supervised = sum(record["supervised_tokens"] for record in records)
    return Metrics(
        samples=len(records),
        bit_match=_ratio(sum(record["correct_tokens"] for record in records), supervised),
        exact_match=_share_true(records, "exact"),
        nll=_ratio(sum(_nll(record) for record in records), supervised),
        gen_exact_match=_share_true(records, "gen_exact"),
    )


def _nll(record: Mapping[str, Any]) -> float:
    nll = record["nll"]
    return math.nan if nll is None else nll


def _mean_defined(values: Iterable[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return _ratio(sum(defined), len(defined))


def summarize(records: Sequence[Mapping[str, Any]]) -> Summary:
    """Aggregate records overall, per ``group`` and as the macro average over the groups.

    Ratios are ratios of sums (a sample weighs by its supervised tokens in ``bit_match`` and
    ``nll``), like the streaming metrics; ``exact_match`` counts the samples whose ``exact`` is
    not null. ``macro`` gives each group the same weight: the mean, per metric, of the groups
    where that metric is defined. Records without a ``group`` count only in ``overall``.

    Args:
        records: the records of one evaluation (:attr:`RecordsFile.records`).

    Returns:
        The :class:`Summary`; a ratio with nothing to count (0/0) is ``nan``.

    Example:
        >>> records = [
        ...     {"supervised_tokens": 4, "correct_tokens": 4, "exact": True, "nll": 0.4,
        ...      "group": "a"},
        ...     {"supervised_tokens": 8, "correct_tokens": 2, "exact": False, "nll": 8.0,
        ...      "group": "b"},
        ...     {"supervised_tokens": 0, "correct_tokens": 0, "exact": None, "nll": 0.0,
        ...      "group": "b"},
        ... ]
        >>> summary = summarize(records)
        >>> all_ = summary.overall  # bit_match 6/12, exact_match 1/2, nll 8.4/12
        >>> all_.samples, all_.bit_match, all_.exact_match, round(all_.nll, 3)
        (3, 0.5, 0.5, 0.7)
        >>> summary.groups["b"].bit_match, summary.macro.bit_match  # 2/8, (4/4 + 2/8) / 2
        (0.25, 0.625)
        >>> [name for name, _ in summary.rows()]
        ['all', 'a', 'b', 'macro']
    """
    by_group: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if record.get("group") is not None:
            by_group.setdefault(str(record["group"]), []).append(record)
    groups = {name: _metrics(by_group[name]) for name in sorted(by_group)}
    macro = None
    if groups:
        values = groups.values()
        macro = Metrics(
            samples=sum(metrics.samples for metrics in values),
            bit_match=_mean_defined(metrics.bit_match for metrics in values),
            exact_match=_mean_defined(metrics.exact_match for metrics in values),
            nll=_mean_defined(metrics.nll for metrics in values),
            gen_exact_match=_mean_defined(metrics.gen_exact_match for metrics in values),
        )
    return Summary(overall=_metrics(records), groups=groups, macro=macro)


# ---- formatting --------------------------------------------------------------------------------


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _cell(value: Any) -> str:
    """Text fit for one pipe-table cell: one line, no bare ``|``, at most ``_MAX_TEXT`` chars."""
    if value is None:
        return ""
    text = str(value)
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 3] + "..."
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|")


def _table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    rule = "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _series_title(file: RecordsFile) -> str:
    title = file.stage
    if file.dataloader is not None:
        title += f", dataloader {file.dataloader}"
    if file.kind == "call":
        title += " (by evaluation call: the step was unknown)"
    return title


def _has(records: Iterable[Mapping[str, Any]], key: str) -> bool:
    return any(record.get(key) is not None for record in records)


def _metrics_table(files: Sequence[RecordsFile]) -> list[str]:
    with_gen = any(_has(file.records, "gen_exact") for file in files)
    header = ["step", "group", "samples", "bit_match", "exact_match", "nll"]
    header += ["gen_exact_match"] if with_gen else []
    rows = []
    for file in files:
        for name, metrics in summarize(file.records).rows():
            row = [file.label, _cell(name), str(metrics.samples), _number(metrics.bit_match)]
            row += [_number(metrics.exact_match), _number(metrics.nll)]
            row += [_number(metrics.gen_exact_match)] if with_gen else []
            rows.append(row)
    return _table(header, "rlrrrr" + "r" * with_gen, rows)


def _text_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return [key for key in ("prediction", "reference", "generated") if _has(records, key)]


def _worst(file: RecordsFile, count: int) -> list[str]:
    scored = [record for record in file.records if record["supervised_tokens"] > 0]
    # A null NLL (not computed) orders by the share, then the index.
    scored.sort(
        key=lambda r: (r["correct_tokens"] / r["supervised_tokens"], -(r["nll"] or 0.0), r["index"])
    )
    shown = scored[:count]
    if not scored:
        return [f"No sample with supervised tokens at {file.moment}."]
    title = f"Worst {len(shown)} of {len(scored)} samples at {file.moment}"
    lines = [f"{title} (lowest share of correct tokens first, then highest NLL):"]
    if not shown:
        return lines
    lines.append("")
    texts = _text_columns(shown)
    with_group = _has(shown, "group")
    header = ["index", *(["group"] * with_group), "correct", "share", "nll", *texts]
    rows = []
    for r in shown:
        row = [str(r["index"]), *([_cell(r.get("group"))] * with_group)]
        row += [f"{r['correct_tokens']}/{r['supervised_tokens']}"]
        row += [_number(r["correct_tokens"] / r["supervised_tokens"]), _number(_nll(r))]
        rows.append(row + [_cell(r.get(key)) for key in texts])
    align = "r" + "l" * with_group + "rrr" + "l" * len(texts)
    return lines + _table(header, align, rows)


def _flip_list(name: str, flipped: list[Mapping[str, Any]], count: int) -> list[str]:
    lines = [f"{name}: {len(flipped)}"]
    shown = flipped[:count]
    if shown:
        texts = _text_columns(shown)
        with_group = _has(shown, "group")
        header = ["index", *(["group"] * with_group), "correct", *texts]
        rows = [
            [str(r["index"]), *([_cell(r.get("group"))] * with_group)]
            + [f"{r['correct_tokens']}/{r['supervised_tokens']}"]
            + [_cell(r.get(key)) for key in texts]
            for r in shown
        ]
        lines += ["", *_table(header, "r" + "l" * with_group + "r" + "l" * len(texts), rows)]
    if len(flipped) > len(shown):
        lines.append(f"... and {len(flipped) - len(shown)} more")
    return lines


def _flips(previous: RecordsFile, last: RecordsFile, count: int) -> list[str]:
    before = {record["index"]: record["exact"] for record in previous.records}
    lost, gained = [], []
    for record in last.records:
        was, now = before.get(record["index"]), record["exact"]
        if was is True and now is False:
            lost.append(record)
        elif was is False and now is True:
            gained.append(record)
    lines = [
        f"Samples whose exact match flipped between {previous.moment} and {last.moment} "
        f"(matched by index; text of {last.moment}):",
        "",
        *_flip_list("right -> wrong", lost, count),
        "",
        *_flip_list("wrong -> right", gained, count),
    ]
    return lines


def _group_series(files: Sequence[RecordsFile]) -> list[list[RecordsFile]]:
    series: dict[tuple[str, int | None, str], list[RecordsFile]] = {}
    for file in files:
        series.setdefault(file.series, []).append(file)
    return [
        sorted(members, key=lambda f: f.step)
        for _, members in sorted(
            series.items(), key=lambda item: (item[0][0], _dataloader_key(item[0][1]), item[0][2])
        )
    ]


def format_report(files: Sequence[RecordsFile], worst: int = 10) -> str:
    """Write the report of some records files as text (Markdown pipe tables).

    One section per stage and dataloader (and per ``call`` numbering, whose counters are no
    steps): the metrics of every step, overall, per group and macro (``-`` where 0/0); the
    ``worst`` samples of the last step; and the samples whose ``exact`` flipped between the
    last two steps, right to wrong and wrong to right, at most ``worst`` of each listed.

    Args:
        files: what :func:`load_records` returned.
        worst: how many samples to list at most in each list (0 keeps only the counts).

    Returns:
        The report, without a trailing newline.

    Example:
        >>> records = [
        ...     {"index": 0, "supervised_tokens": 4, "correct_tokens": 3, "exact": False,
        ...      "nll": 2.0, "prediction": "0100", "reference": "0101"},
        ...     {"index": 1, "supervised_tokens": 4, "correct_tokens": 4, "exact": True,
        ...      "nll": 0.5, "prediction": "1111", "reference": "1111"},
        ... ]
        >>> file = RecordsFile("val", 300, "step", None, Path("val_step0000300.jsonl"), records)
        >>> print(format_report([file], worst=1))
        ## val
        <BLANKLINE>
        | step | group | samples | bit_match | exact_match | nll |
        |---:|:---|---:|---:|---:|---:|
        | 300 | all | 2 | 0.875 | 0.500 | 0.312 |
        <BLANKLINE>
        Worst 1 of 2 samples at step 300 (lowest share of correct tokens first, then highest NLL):
        <BLANKLINE>
        | index | correct | share | nll | prediction | reference |
        |---:|---:|---:|---:|:---|:---|
        | 0 | 3/4 | 0.750 | 2.000 | 0100 | 0101 |
        <BLANKLINE>
        Only one step (step 300): no flips to compare.
    """
    if worst < 0:
        raise ValueError(f"`worst` must be 0 or more, got {worst}.")
    sections = []
    for series in _group_series(files):
        last = series[-1]
        lines = [f"## {_series_title(last)}", "", *_metrics_table(series), ""]
        lines += _worst(last, worst) + [""]
        if len(series) > 1:
            lines += _flips(series[-2], last, worst)
        else:
            lines.append(f"Only one step ({last.moment}): no flips to compare.")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


# ---- drawing -----------------------------------------------------------------------------------


def plot_report(files: Sequence[RecordsFile], out_png: str | Path, dpi: int = 150) -> Path:
    """Draw bit-match and exact-match against the step, one line per group and ``all``.

    Two panels (bit-match, exact-match); with several stages or dataloaders, each line's label
    starts with its series (``val``, ``val dl1``...).

    Args:
        files: what :func:`load_records` returned.
        out_png: where to write the PNG (its directory is created when missing).
        dpi: resolution of the PNG.

    Returns:
        ``out_png`` as a :class:`~pathlib.Path`.

    Raises:
        ModuleNotFoundError: when matplotlib is not installed (the message says what to install).

    Example:
        >>> import tempfile
        >>> record = {"index": 0, "supervised_tokens": 2, "correct_tokens": 1, "exact": False,
        ...           "nll": 1.0}
        >>> file = RecordsFile("val", 10, "step", None, Path("val_step0000010.jsonl"), [record])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     png = plot_report([file], Path(tmp, "report.png"))
        ...     png.read_bytes()[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(
            f"Drawing the report needs matplotlib, which is not installed: {_DEMO_EXTRA}",
            name="matplotlib",
        ) from None
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    all_series = _group_series(files)
    # A bare Figure on an Agg canvas: no pyplot state, no open window, nothing to close.
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    bit_ax, exact_ax = fig.subplots(1, 2, sharex=True)
    colors: dict[str, str] = {}
    styles = ("-", "--", ":", "-.")
    for number, series in enumerate(all_series):
        prefix = ""
        if len(all_series) > 1:
            first = series[0]
            prefix = first.stage + ("" if first.dataloader is None else f" dl{first.dataloader}")
            prefix += " (calls)" if first.kind == "call" else ""
            prefix += ": "
        steps = [file.step for file in series]
        summaries = [summarize(file.records) for file in series]
        names = ["all", *sorted({name for s in summaries for name in s.groups})]
        for name in names:
            color = colors.setdefault(name, "black" if name == "all" else f"C{len(colors) % 10}")
            if name == "all":
                points = [s.overall for s in summaries]
            else:
                points = [s.groups.get(name) for s in summaries]
            for ax, attribute in ((bit_ax, "bit_match"), (exact_ax, "exact_match")):
                values = [math.nan if p is None else getattr(p, attribute) for p in points]
                ax.plot(
                    steps,
                    values,
                    styles[number % len(styles)],
                    marker="o",
                    color=color,
                    lw=2.5 if name == "all" else 1.6,
                    ms=4,
                    label=prefix + name,
                )
    kinds = {file.kind for file in files}
    # Call counters are no steps: the label says so when both share the axis.
    xlabel = "step (or evaluation call)"
    if len(kinds) == 1:
        xlabel = "step" if kinds == {"step"} else "evaluation call"
    for ax, title in ((bit_ax, "bit-match (tokens)"), (exact_ax, "exact-match (samples)")):
        ax.set_title(title, fontsize=13)
        ax.set_xlabel(xlabel, fontsize=12)
        ax.set_ylabel("accuracy", fontsize=12)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=11)
        ax.grid(alpha=0.3)
    if bit_ax.lines:
        fig.legend(
            handles=bit_ax.lines,
            loc="outside lower center",
            ncols=min(len(bit_ax.lines), 5),
            fontsize=11,
            frameon=False,
        )
    fig.suptitle("mllm-metrics report", fontsize=14)
    fig.savefig(out_png, dpi=dpi)
    return out_png


# ---- command line ------------------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Report the per-sample records an evaluation wrote to PATH "
        "({stage}_step{N}.jsonl files): the metrics per step and per group, the worst samples "
        "of the last step, the samples whose exact match flipped between the last two steps, "
        f"and a plot of the curves (the plot needs matplotlib: {_DEMO_EXTRA}).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = parser.add_argument
    arg("path", type=Path, metavar="PATH", help="the records directory")
    arg("--worst", type=int, default=10, metavar="N", help="samples to list in each list")
    arg("--plot", type=Path, default=None, metavar="PNG", help="the PNG (default PATH/report.png)")
    arg("--no-plot", action="store_true", help="write no PNG")
    return parser


def report_main(argv: Sequence[str] | None = None, prog: str = "mllm-metrics report") -> int:
    """Print the report of a records directory and draw its plot (``mllm-metrics report``).

    Args:
        argv: the arguments; None reads ``sys.argv[1:]``.
        prog: the program name shown in ``--help`` and in error messages.

    Returns:
        The exit status: 0; 1 (after one line on stderr) when ``PATH`` is missing, holds no
        records file or a malformed one, or when ``--plot`` was asked for without matplotlib
        (without ``--plot``, a missing matplotlib only skips the default PNG, with a note).
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.worst < 0:
        parser.error(f"--worst must be 0 or more, got {args.worst}")
    try:
        files = load_records(args.path)
    except (FileNotFoundError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    if not files:
        print(
            f"{prog}: no records file ({{stage}}_step{{N}}.jsonl) in {str(args.path)!r}.",
            file=sys.stderr,
        )
        return 1
    print(format_report(files, worst=args.worst))
    if args.no_plot:
        return 0
    png = args.plot if args.plot is not None else args.path / "report.png"
    try:
        plot_report(files, png)
    except ModuleNotFoundError as error:
        if error.name != "matplotlib":
            raise
        if args.plot is None:
            print(f"{prog}: no plot: {error}", file=sys.stderr)
            return 0
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    print(f"\nPlot: {png}")
    return 0
