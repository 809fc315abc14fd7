"""The report as Markdown: the metrics tables, the worst samples and the flips.

What ``mllm-metrics report`` prints, and the text the experiment trackers show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mllm_metrics.report.metrics import has_error, nll_value, share, summarize
from mllm_metrics.report.records import RecordsFile, UnreadFile
from mllm_metrics.report.series import (
    EvalSet,
    FlipChoice,
    Flips,
    Series,
    _count,
    comparable_text,
    default_flips,
    group_series,
)

__all__ = ["flips_section", "format_report", "worst_samples", "worst_section"]

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

    Lowest share of correct tokens first, then highest NLL (an NLL that is null or NaN counts
    as 0: a NaN would make the order arbitrary), then the index. Samples with every supervised
    token right, or with none, are left out.

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
    wrong.sort(key=lambda r: (share(r), -_known_nll(r), r["index"]))
    return wrong


def _known_nll(record: Mapping[str, Any]) -> float:
    nll = nll_value(record)
    return 0.0 if math.isnan(nll) else nll


def worst_section(file: RecordsFile, count: int) -> list[str]:
    """The report's "worst samples" lines of one evaluation (Markdown), at most ``count``."""
    scored = [record for record in file.records if record["supervised_tokens"] > 0]
    if not scored:
        return [f"No sample with supervised tokens at {file.moment}."]
    wrong = worst_samples(scored)
    right = len(scored) - len(wrong)
    verb = "is" if right == 1 else "are"
    right_text = f"{right} of the {_count(len(scored))} with supervised tokens {verb} all right"
    if not wrong:
        return [f"No sample with an error at {file.moment}: {right_text}."]
    shown = wrong[:count]
    if not shown:
        return [
            f"{_count(len(wrong))} with an error at {file.moment} ({right_text}); "
            "none listed (worst 0)."
        ]
    lines = [
        f"Worst {len(shown)} of the {_count(len(wrong))} with an error at {file.moment} "
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


def flips_section(eval_set: EvalSet, count: int, choice: FlipChoice | None = None) -> list[str]:
    """The report's flips lines between the two evaluations the report compares (Markdown);
    ``choice``: what :func:`~mllm_metrics.report.series.default_flips` chose, when known."""
    choice = default_flips(eval_set) if choice is None else choice
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
        >>> from pathlib import Path
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
