"""``mllm-metrics report PATH``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mllm_metrics.report.markdown import format_report
from mllm_metrics.report.plot import DEMO_EXTRA, plot_report
from mllm_metrics.report.records import scan_records
from mllm_metrics.report.series import group_series

__all__ = ["report_main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Report the per-sample records an evaluation wrote to PATH "
        "({stage}_step{N}.jsonl files): the metrics per step and per group, the samples with "
        "an error at the last step, worst first, the samples whose exact match flipped between "
        "the last two steps, a plot of the curves (the plot needs matplotlib: "
        f"{DEMO_EXTRA}) and, with --html, all of it as one self-contained web page with a "
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
