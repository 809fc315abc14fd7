"""Reading records files back: the evaluations of a records directory, and the files that fail.

An evaluation with ``records_dir`` set writes one JSON Lines file per evaluation (see
:mod:`mllm_metrics.records`), named ``{stage}_step{N:07d}.jsonl`` (``_dl{N}`` before the suffix
with several dataloaders; ``_call{N}`` instead of ``_step{N}`` when the step is unknown;
``-2``, ``-3``... at the end of the name for another evaluation at the same step, which does not
overwrite the first).
:func:`scan_records` reads every such file of a directory and sets apart, with the reason, each
one that cannot be read (not UTF-8, not JSON, a record without a required key, a count that
cannot be...), so that one bad file does not hide the others; :func:`load_records` is its strict
form, which raises on the first bad file.

Only the standard library is imported here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RecordsFile", "RecordsScan", "UnreadFile", "load_records", "scan_records"]

# The stage is lazy so that `my_eval_step0000040` gives stage `my_eval`.
_NAME = re.compile(
    r"^(?P<stage>.+?)_(?P<kind>step|call)(?P<number>\d+)(?:_dl(?P<dl>\d+))?(?:-(?P<repeat>\d+))?"
    r"\.jsonl$"
)
_REQUIRED = ("index", "supervised_tokens", "correct_tokens", "exact", "nll")
_TEXTS = ("prediction", "reference", "generated")
# How much of a bad value an error message quotes.
_QUOTE = 40


@dataclass
class RecordsFile:
    """One records file: the evaluation it comes from and its samples.

    Attributes:
        stage: the prefix of the file name (``val``, ``test``, ``eval``...).
        step: the global step, or the evaluation's call counter when ``kind == "call"``.
        kind: ``"step"``, or ``"call"`` when the writer did not know the step.
        dataloader: the ``N`` of ``_dl{N}``; None without the suffix.
        path: where it was read.
        records: one dict per line, sorted by ``index``.
        mtime: when the file was last written (seconds since the epoch); None when unknown.
            The report orders the evaluations of one eval set by it to tell runs apart.
        repeat: 1, or the ``N`` of a name ending in ``-N`` (the ``N``-th evaluation written at
            this step).
    """

    stage: str
    step: int
    kind: str
    dataloader: int | None
    path: Path
    records: list[dict[str, Any]] = field(repr=False)
    mtime: float | None = field(default=None, repr=False)
    repeat: int = 1

    @property
    def label(self) -> str:
        """``"300"`` for a step, ``"call 3"`` for a call counter; ``"300 #2"`` for a repeat."""
        label = str(self.step) if self.kind == "step" else f"call {self.step}"
        return label if self.repeat == 1 else f"{label} #{self.repeat}"

    @property
    def moment(self) -> str:
        """``"step 300"``, or ``"call 3"`` when the step was unknown; ``"step 300 #2"``..."""
        return f"step {self.label}" if self.kind == "step" else self.label

    @property
    def series(self) -> tuple[str, int | None, str]:
        """The files whose steps follow each other: same stage, dataloader and kind."""
        return (self.stage, self.dataloader, self.kind)


@dataclass(frozen=True)
class UnreadFile:
    """A records file that could not be read, and why.

    Attributes:
        path: the file.
        problem: what was wrong, e.g. ``"not valid JSON (Expecting value: column 1)"``.
        line: the line (from 1) where it was found; None for the file as a whole.
    """

    path: Path
    problem: str
    line: int | None = None

    @property
    def reason(self) -> str:
        """``"line 3: <problem>"``, or the problem alone when it is not on one line."""
        return self.problem if self.line is None else f"line {self.line}: {self.problem}"

    def __str__(self) -> str:
        where = str(self.path) if self.line is None else f"{self.path}, line {self.line}"
        return f"{where}: {self.problem}"


@dataclass
class RecordsScan:
    """What :func:`scan_records` found in a directory.

    Attributes:
        directory: the directory read.
        files: the records files read, sorted by stage, dataloader (none first), kind and step.
        unread: the records files that could not be read, sorted by name.
    """

    directory: Path
    files: list[RecordsFile]
    unread: list[UnreadFile]


class _BadFile(Exception):
    def __init__(self, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, line


def scan_records(path: str | Path) -> RecordsScan:
    """Read every records file in the directory ``path``, setting apart those that fail.

    Files whose name is not a records file name are ignored (``report.png``, ``*.partial``...).
    A records file fails as a whole on its first bad line: bytes that are not UTF-8, a line
    that is not a JSON object, a required key (``index``, ``supervised_tokens``,
    ``correct_tokens``, ``exact``, ``nll``) missing or of the wrong type, counts that cannot be
    (negative, or more correct tokens than supervised ones), an ``index`` seen twice, or a text
    field (``prediction``, ``reference``, ``generated``) that is not a string.

    Args:
        path: the ``records_dir`` of an evaluation.

    Returns:
        The :class:`RecordsScan`: the files read and the files that failed, with the reason.

    Raises:
        FileNotFoundError: when ``path`` is not a directory.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     good = '{"index": 0, "supervised_tokens": 4, "correct_tokens": 3, '
        ...     good += '"exact": false, "nll": 1.5}\\n'
        ...     _ = Path(tmp, "val_step0000300.jsonl").write_text(good)
        ...     _ = Path(tmp, "val_step0000400.jsonl").write_text(good + good[:30])
        ...     scan = scan_records(tmp)
        >>> [(f.stage, f.step, len(f.records)) for f in scan.files]
        [('val', 300, 1)]
        >>> [(u.path.name, u.line) for u in scan.unread]
        [('val_step0000400.jsonl', 2)]
        >>> print(scan.unread[0].problem)
        not valid JSON (Unterminated string starting at: column 14); the file ends in the middle of this line: it looks truncated (a copy or a write that was cut off)
    """  # noqa: E501
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"No records directory at {str(directory)!r}: expected the folder an evaluation "
            "wrote its {stage}_step{N}.jsonl files to (its records_dir)."
        )
    files, unread = [], []
    for file in sorted(directory.iterdir()):
        match = _NAME.match(file.name)
        if match is None or not file.is_file():
            continue
        try:
            records, mtime = _read_file(file)
        except _BadFile as error:
            unread.append(UnreadFile(file, error.problem, error.line))
            continue
        dataloader, repeat = match["dl"], match["repeat"]
        files.append(
            RecordsFile(
                stage=match["stage"],
                step=int(match["number"]),
                kind=match["kind"],
                dataloader=None if dataloader is None else int(dataloader),
                path=file,
                records=records,
                mtime=mtime,
                repeat=1 if repeat is None else int(repeat),
            )
        )
    files.sort(
        key=lambda f: (
            f.stage,
            _dataloader_key(f.dataloader),
            f.kind,
            f.step,
            f.repeat,
            f.path.name,
        )
    )
    return RecordsScan(directory=directory, files=files, unread=unread)


def load_records(path: str | Path) -> list[RecordsFile]:
    """Read every records file in the directory ``path``; other files are ignored.

    The strict form of :func:`scan_records`: any records file that cannot be read is an error.

    Args:
        path: the ``records_dir`` of an evaluation.

    Returns:
        The files sorted by stage, dataloader (none first), kind and step; empty when there are
        none.

    Raises:
        FileNotFoundError: when ``path`` is not a directory.
        ValueError: on the first records file that cannot be read (see :func:`scan_records`);
            the message names the file, the line and what was wrong.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = Path(tmp, "val_step0000300_dl1.jsonl").write_text(
        ...         '{"index": 0, "supervised_tokens": 4, "correct_tokens": 3, '
        ...         '"exact": false, "nll": 1.5}\\n'
        ...     )
        ...     [(f.stage, f.step, f.kind, f.dataloader, len(f.records)) for f in load_records(tmp)]
        [('val', 300, 'step', 1, 1)]
    """
    scan = scan_records(path)
    if scan.unread:
        raise ValueError(f"{scan.unread[0]}.")
    return scan.files


def _dataloader_key(dataloader: int | None) -> int:
    return -1 if dataloader is None else dataloader


def _read_file(file: Path) -> tuple[list[dict[str, Any]], float | None]:
    try:
        data = file.read_bytes()
        mtime = file.stat().st_mtime
    except OSError as error:
        raise _BadFile(f"cannot be read ({type(error).__name__}: {error.strerror})") from None
    lines = data.split(b"\n")
    truncated = bool(lines[-1].strip())  # the writer ends every line, the last one too
    records: list[dict[str, Any]] = []
    seen: dict[int, int] = {}  # index -> line
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():  # the end of the file, or a blank line between records
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            byte = raw[error.start]
            raise _BadFile(
                f"not UTF-8 text (byte 0x{byte:02x} at column {error.start + 1}): records are "
                "written as UTF-8 JSON, so this file was damaged or is not a records file",
                number,
            ) from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg}: column {error.colno})"
            if truncated and number == len(lines):
                problem += (
                    "; the file ends in the middle of this line: it looks truncated (a copy or "
                    "a write that was cut off)"
                )
            else:
                problem += "; expected one JSON object per line"
            raise _BadFile(problem, number) from None
        problem = _check_record(record)
        if problem is not None:
            raise _BadFile(problem, number)
        index = record["index"]
        if index in seen:
            raise _BadFile(
                f"index {index} again (also on line {seen[index]}): one file holds one "
                "evaluation, where each index is one sample; two files may have been concatenated",
                number,
            )
        seen[index] = number
        records.append(record)
    records.sort(key=lambda record: record["index"])
    return records, mtime


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _quote(value: Any, width: int = _QUOTE) -> str:
    """``value`` as JSON, cut to ``width`` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_record(record: Any) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object (one record), got {type(record).__name__}"
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        return (
            f"the record has no {', '.join(map(repr, missing))}; every record has "
            f"{', '.join(_REQUIRED)} (is this a records file of mllm-metrics?)"
        )
    for key in ("index", "supervised_tokens", "correct_tokens"):
        if not _is_int(record[key]):
            return f"{key!r} must be an integer, got {_quote(record[key])}"
    supervised, correct = record["supervised_tokens"], record["correct_tokens"]
    if supervised < 0 or not 0 <= correct <= supervised:
        return (
            f"'correct_tokens' {correct} and 'supervised_tokens' {supervised}: expected "
            "0 <= correct_tokens <= supervised_tokens"
        )
    for key in ("exact", "gen_exact"):
        if record.get(key) is not None and not isinstance(record[key], bool):
            return f"{key!r} must be true, false or null, got {_quote(record[key])}"
    nll = record["nll"]  # null when the evaluation did not compute it (`nll=False`)
    if nll is not None and (not isinstance(nll, (int, float)) or isinstance(nll, bool)):
        return f"'nll' must be a number or null, got {_quote(nll)}"
    for key in _TEXTS:
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key!r} must be a string or null, got {_quote(record[key])}"
    return None
