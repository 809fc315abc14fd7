"""The terminal report, its picture and the ``mllm-metrics report`` command line."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mllm_metrics.report.metrics import Metrics, Summary, has_error, nll_value, share, summarize
from mllm_metrics.report.records import (
    RecordsFile,
    RecordsScan,
    UnreadFile,
    load_records,
    scan_records,
)
from mllm_metrics.report.series import (
    EvalSet,
    Flips,
    Series,
    comparable_text,
    default_flips,
    group_series,
)

__all__ = [
    "Metrics",
    "RecordsFile",
    "RecordsScan",
    "Summary",
    "UnreadFile",
    "curve_sets",
    "format_report",
    "group_series",
    "load_records",
    "plot_report",
    "report_main",
    "scan_records",
    "summarize",
    "worst_samples",
]

_DEMO_EXTRA = 'pip install "mllm-metrics[demo]"'
# Decoded text may be long or span lines: one table cell shows at most this many characters.
_MAX_TEXT = 60


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


def _has(records: Iterable[Mapping[str, Any]], key: str) -> bool:
    return any(record.get(key) is not None for record in records)


def _samples(count: int) -> str:
    return f"{count} sample" + ("" if count == 1 else "s")


def _metrics_table(eval_set: EvalSet) -> list[str]:
    files = eval_set.files
    with_gen = any(_has(file.records, "gen_exact") for file in files)
    with_run = len(eval_set.runs) > 1
    header = ["step", *(["run"] * with_run), "group", "samples", "bit_match", "exact_match"]
    header += ["nll", *(["gen_exact_match"] * with_gen)]
    rows = []
    for run in eval_set.runs:
        for file in run.files:
            for name, metrics in summarize(file.records).rows():
                row = [file.label, *([str(run.number)] * with_run), _cell(name)]
                row += [str(metrics.samples), _number(metrics.bit_match)]
                row += [_number(metrics.exact_match), _number(metrics.nll)]
                row += [_number(metrics.gen_exact_match)] if with_gen else []
                rows.append(row)
    return _table(header, "r" + "r" * with_run + "lrrrr" + "r" * with_gen, rows)


def _text_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return [key for key in ("prediction", "reference", "generated") if _has(records, key)]


def worst_samples(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The samples with a wrong supervised token, worst first.

    Lowest share of correct tokens first, then highest NLL (a null NLL counts as 0), then the
    index. Samples with every supervised token right, or with none, are left out.

    Args:
        records: the records of one evaluation.

    Returns:
        The records with an error, in that order.

    Examples:
        >>> records = [
        ...     {"index": 0, "supervised_tokens": 4, "correct_tokens": 4, "nll": 0.1},
        ...     {"index": 1, "supervised_tokens": 4, "correct_tokens": 2, "nll": 1.0},
        ...     {"index": 2, "supervised_tokens": 2, "correct_tokens": 1, "nll": 3.0},
        ...     {"index": 3, "supervised_tokens": 0, "correct_tokens": 0, "nll": 0.0},
        ... ]
        >>> [r["index"] for r in worst_samples(records)]  # 1/2 twice: the higher NLL first
        [2, 1]
    """
    wrong = [record for record in records if has_error(record)]
    wrong.sort(key=lambda r: (share(r), -(r["nll"] or 0.0), r["index"]))
    return wrong


def worst_section(file: RecordsFile, count: int) -> list[str]:
    """The report's "worst samples" lines of one evaluation (Markdown), at most ``count``."""
    scored = [record for record in file.records if record["supervised_tokens"] > 0]
    if not scored:
        return [f"No sample with supervised tokens at {file.moment}."]
    wrong = worst_samples(scored)
    right = len(scored) - len(wrong)
    verb = "is" if right == 1 else "are"
    right_text = f"{right} of the {_samples(len(scored))} with supervised tokens {verb} all right"
    if not wrong:
        return [f"No sample with an error at {file.moment}: {right_text}."]
    shown = wrong[:count]
    if not shown:
        return [
            f"{_samples(len(wrong))} with an error at {file.moment} ({right_text}); "
            "none listed (worst 0)."
        ]
    lines = [
        f"Worst {len(shown)} of the {_samples(len(wrong))} with an error at {file.moment} "
        f"(lowest share of correct tokens first, then highest NLL); {right_text}:",
        "",
    ]
    texts = _text_columns(shown)
    with_group = _has(shown, "group")
    header = ["index", *(["group"] * with_group), "correct", "share", "nll", *texts]
    rows = []
    for r in shown:
        row = [str(r["index"]), *([_cell(r.get("group"))] * with_group)]
        row += [f"{r['correct_tokens']}/{r['supervised_tokens']}"]
        row += [_number(share(r)), _number(nll_value(r))]
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


def flips_section(eval_set: EvalSet, count: int) -> list[str]:
    """The report's flips lines between the two evaluations the report compares (Markdown)."""
    choice = default_flips(eval_set)
    if choice.flips is None:
        note = choice.note
        return [note if note.endswith(".") else note[0].upper() + note[1:] + "."]
    flips: Flips = choice.flips
    before, after = flips.before, flips.after
    why = comparable_text(eval_set, len(after.records))
    chosen = f"; {choice.note}" if choice.note else ""
    if not flips.lost and not flips.gained:
        return [
            f"No sample's exact match flipped between {before.moment} and {after.moment} "
            f"({why}{chosen})."
        ]
    lines = [
        f"Samples whose exact match flipped between {before.moment} and {after.moment} "
        f"(matched by index: {why}{chosen}; text of {after.moment}):",
    ]
    if flips.lost:
        lines += ["", *_flip_list("right -> wrong", flips.lost, count)]
    if flips.gained:
        lines += ["", *_flip_list("wrong -> right", flips.gained, count)]
    return lines


def _unread_section(unread: Sequence[UnreadFile]) -> str:
    lines = [
        f"## Files not read ({len(unread)})",
        "",
        "These records files could not be read; the report leaves them out:",
        "",
    ]
    lines += [f"- {file.path.name}: {file.reason}" for file in unread]
    return "\n".join(lines)


def _series_section(series: Series, worst: int) -> str:
    lines = [f"## {series.title}", ""]
    for note in series.notes:
        lines += [f"Warning: {note}", ""]
    for eval_set in series.eval_sets:
        if eval_set.of > 1:
            lines += [f"### eval set {eval_set.number} of {eval_set.of}", ""]
        lines += [*_metrics_table(eval_set), ""]
        lines += [*worst_section(eval_set.last, worst), ""]
        lines += [*flips_section(eval_set, worst), ""]
    return "\n".join(lines).rstrip("\n")


def format_report(
    files: Sequence[RecordsFile], worst: int = 10, unread: Sequence[UnreadFile] = ()
) -> str:
    """Write the report of some records files as text (Markdown pipe tables).

    First the files that could not be read, if any (``unread``). Then one section per stage
    and dataloader (and per ``call`` numbering, whose counters are no steps), which starts with
    a warning when its files hold several eval sets or come from several runs, and then, per eval
    set: the metrics of every step, overall, per group and macro (``-`` where 0/0); the
    ``worst`` samples with an error at the last step (and how many are all right); and the
    samples whose ``exact`` flipped between the last two steps of the latest run, right to wrong
    and wrong to right, at most ``worst`` of each listed. A list with nothing in it is left out.

    Args:
        files: what :func:`load_records` returned (or :attr:`RecordsScan.files`).
        worst: how many samples to list at most in each list (0 keeps only the counts).
        unread: the files that could not be read (:attr:`RecordsScan.unread`).

    Returns:
        The report, without a trailing newline.

    Raises:
        ValueError: when ``worst`` is negative.

    Examples:
        >>> records = [
        ...     {"index": 0, "supervised_tokens": 4, "correct_tokens": 3, "exact": False,
        ...      "nll": 2.0, "prediction": "0100", "reference": "0101"},
        ...     {"index": 1, "supervised_tokens": 4, "correct_tokens": 4, "exact": True,
        ...      "nll": 0.5, "prediction": "1111", "reference": "1111"},
        ... ]
        >>> file = RecordsFile("val", 300, "step", None, Path("val_step0000300.jsonl"), records)
        >>> print(format_report([file], worst=1))  # doctest: +NORMALIZE_WHITESPACE
        ## val
        <BLANKLINE>
        | step | group | samples | bit_match | exact_match | nll |
        |---:|:---|---:|---:|---:|---:|
        | 300 | all | 2 | 0.875 | 0.500 | 0.312 |
        <BLANKLINE>
        Worst 1 of the 1 sample with an error at step 300 (lowest share of correct tokens
        first, then highest NLL); 1 of the 2 samples with supervised tokens is all right:
        <BLANKLINE>
        | index | correct | share | nll | prediction | reference |
        |---:|---:|---:|---:|:---|:---|
        | 0 | 3/4 | 0.750 | 2.000 | 0100 | 0101 |
        <BLANKLINE>
        Only one step (step 300): no flips to compare.
    """
    if worst < 0:
        raise ValueError(f"`worst` must be 0 or more, got {worst}.")
    sections = [_unread_section(unread)] if unread else []
    sections += [_series_section(series, worst) for series in group_series(files)]
    return "\n\n".join(sections)


# ---- drawing -----------------------------------------------------------------------------------


def curve_sets(files: Sequence[RecordsFile]) -> list[tuple[str, list[RecordsFile]]]:
    """The evaluations that one line may join, each with a short name: one per run of an eval set.

    Lines must not join evaluations of different eval sets or runs: each such set of
    evaluations is drawn (and named) apart.

    Args:
        files: what :func:`load_records` returned.

    Returns:
        ``(name, files sorted by step)`` per series, eval set and run: ``"val"``, ``"val dl1"``,
        ``"eval (calls)"``, with ``" set 2"`` and ``" run 2"`` when a series has several.

    Examples:
        >>> record = {"index": 0, "supervised_tokens": 2, "correct_tokens": 1, "exact": False,
        ...           "nll": 1.0}
        >>> files = [RecordsFile("val", s, "step", d, Path(f"{s}{d}"), [record])
        ...          for s, d in ((10, None), (20, None), (10, 1))]
        >>> [(name, [f.step for f in members]) for name, members in curve_sets(files)]
        [('val', [10, 20]), ('val dl1', [10])]
    """
    result = []
    for series in group_series(files):
        name = series.stage + ("" if series.dataloader is None else f" dl{series.dataloader}")
        name += " (calls)" if series.kind == "call" else ""
        for eval_set in series.eval_sets:
            for run in eval_set.runs:
                label = name + (f" set {eval_set.number}" if eval_set.of > 1 else "")
                label += f" run {run.number}" if len(eval_set.runs) > 1 else ""
                result.append((label, run.files))
    return result


def plot_report(files: Sequence[RecordsFile], out_png: str | Path, dpi: int = 150) -> Path:
    """Draw bit-match and exact-match against the step, one line per group and ``all``.

    Two panels (bit-match, exact-match); with several stages or dataloaders, eval sets or runs
    (:func:`curve_sets`), each line's label starts with its name (``val``, ``val dl1``...).

    Args:
        files: what :func:`load_records` returned.
        out_png: where to write the PNG (its directory is created when missing).
        dpi: resolution of the PNG.

    Returns:
        ``out_png`` as a :class:`~pathlib.Path`.

    Raises:
        ModuleNotFoundError: when matplotlib is not installed (the message says what to install).

    Examples:
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
    all_sets = curve_sets(files)
    # A bare Figure on an Agg canvas: no pyplot state, no open window, nothing to close.
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    bit_ax, exact_ax = fig.subplots(1, 2, sharex=True)
    colors: dict[str, str] = {}
    styles = ("-", "--", ":", "-.")
    for number, (set_name, series) in enumerate(all_sets):
        prefix = f"{set_name}: " if len(all_sets) > 1 else ""
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
        "({stage}_step{N}.jsonl files): the metrics per step and per group, the samples with "
        "an error at the last step, worst first, the samples whose exact match flipped between "
        "the last two steps, a plot of the curves (the plot needs matplotlib: "
        f"{_DEMO_EXTRA}) and, with --html, all of it as one self-contained web page with a "
        "sortable, filterable table of every sample. A file that cannot be read is named on "
        "stderr with the reason, and the others are reported.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = parser.add_argument
    arg("path", type=Path, metavar="PATH", help="the records directory")
    arg("--worst", type=int, default=10, metavar="N", help="samples to list in each list")
    arg("--plot", type=Path, default=None, metavar="PNG", help="the PNG (default PATH/report.png)")
    arg("--no-plot", action="store_true", help="write no PNG")
    arg(
        "--html",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the report as one self-contained HTML page (no network needed)",
    )
    return parser


def report_main(argv: Sequence[str] | None = None, prog: str = "mllm-metrics report") -> int:
    """Print the report of a records directory, draw its plot, write its page if asked.

    Each records file that cannot be read is named on stderr (and in the report) with the
    reason, and the others are reported; so is each warning about the files (several eval sets
    or runs in one folder).

    Args:
        argv: the arguments; None reads ``sys.argv[1:]``.
        prog: the program name shown in ``--help`` and in error messages.

    Returns:
        The exit status: 0 when at least one records file was read and reported; 1 (with the
        reason on stderr) when ``PATH`` is missing or no records file in it could be read, when
        ``--plot`` was asked for without matplotlib (without ``--plot``, a missing matplotlib
        only skips the default PNG, with a note), or when the ``--html`` page cannot be written.
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.worst < 0:
        parser.error(f"--worst must be 0 or more, got {args.worst}")
    try:
        scan = scan_records(args.path)
    except FileNotFoundError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    for unread in scan.unread:
        print(f"{prog}: skipped {unread}", file=sys.stderr)
    if not scan.files:
        if scan.unread:
            print(
                f"{prog}: none of the {len(scan.unread)} records files in {str(args.path)!r} "
                "could be read (each is named above with the reason).",
                file=sys.stderr,
            )
        else:
            print(
                f"{prog}: no records file ({{stage}}_step{{N}}.jsonl) in {str(args.path)!r}.",
                file=sys.stderr,
            )
        return 1
    for series in group_series(scan.files):
        for note in series.notes:
            print(f"{prog}: warning: {series.title}: {note}", file=sys.stderr)
    print(format_report(scan.files, worst=args.worst, unread=scan.unread))
    if args.html is not None:
        from mllm_metrics.report.html import write_html

        try:
            write_html(scan, args.html)
        except OSError as error:
            print(f"{prog}: cannot write the page {str(args.html)!r}: {error}", file=sys.stderr)
            return 1
        print(f"\nHTML: {args.html}")
    if args.no_plot:
        return 0
    png = args.plot if args.plot is not None else args.path / "report.png"
    try:
        plot_report(scan.files, png)
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
