"""Which records files may be compared: series, eval sets and runs.

A records file holds one evaluation, its samples matched to other evaluations by ``index``. Two
evaluations compare sample by sample only when they are of the same **eval set** (the same
indexes, each with the same number of supervised tokens, and the same ``reference`` and
``group`` where the records have them) and of the same **run** (one training run, whose steps
follow each other). A folder where two runs wrote their files breaks both: a second run on
other data gives another eval set under the same file names, and a run that starts again writes
steps that restart. This module sorts the files of a folder accordingly:

- a :class:`Series` is one stage, dataloader and kind of counter (``val``, ``val`` dataloader 1,
  ``eval`` by call...), as the file names say;
- each series is split into :class:`EvalSet` s by the samples the files hold;
- each eval set is split into :class:`Run` s by the order the files were written in (their
  modification times): a step that comes again, or a smaller step written well after a larger
  one, starts a new run.

Each split is explained in :attr:`Series.notes`, and :func:`flips` refuses two evaluations of
different eval sets. Only the standard library is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mllm_metrics.report.records import RecordsFile, _dataloader_key, _quote

__all__ = [
    "WRITE_ORDER_SLACK_S",
    "EvalSet",
    "FlipChoice",
    "Flips",
    "Run",
    "Series",
    "comparable_text",
    "default_flips",
    "difference",
    "flips",
    "group_series",
]

#: A smaller step written at most this many seconds after a larger one is not taken for a
#: restart: copying a folder writes its files in any order within moments, while a run that
#: starts again needs more than this to start and reach its first evaluation.
WRITE_ORDER_SLACK_S = 2.0
# How much of a differing value a message quotes.
_QUOTE = 24
# Past this many evaluations, a list of steps is shown as its first and last.
_MAX_LISTED = 6


@dataclass
class Run:
    """Evaluations of one eval set written by one run, sorted by step.

    Attributes:
        number: 1 for the run that wrote first, then 2...
        files: its records files, sorted by step.
    """

    number: int
    files: list[RecordsFile]


@dataclass
class EvalSet:
    """The evaluations of a series that hold the same samples.

    Attributes:
        number: 1 for the eval set of the series' first step, then 2...
        of: how many eval sets the series holds.
        runs: the runs that evaluated it, in the order they wrote (:attr:`Run.number`).
        checked: what was compared per index to find it the same: ``"supervised tokens"``,
            then ``"reference"`` and ``"group"`` when the records have them.
    """

    number: int
    of: int
    runs: list[Run]
    checked: tuple[str, ...]

    @property
    def files(self) -> list[RecordsFile]:
        """Every evaluation, run by run, each run sorted by step."""
        return [file for run in self.runs for file in run.files]

    @property
    def last(self) -> RecordsFile:
        """The last step of the run that wrote last: the evaluation the report looks at."""
        return self.runs[-1].files[-1]

    def run_of(self, file: RecordsFile) -> Run:
        """The run that wrote ``file`` (one of :attr:`files`)."""
        for run in self.runs:
            if any(member is file for member in run.files):
                return run
        raise ValueError(
            f"{file.path} is not an evaluation of this eval set (its files: "
            f"{', '.join(f.path.name for f in self.files)}). Files are matched by identity: "
            "pass a RecordsFile from the same `group_series` call, not an equal one re-read."
        )

    def same_run(self, before: RecordsFile, after: RecordsFile) -> str | None:
        """Why ``before`` and ``after`` are not two evaluations of one run, or None if they are.

        Examples:
            >>> from pathlib import Path
            >>> def file(step, mtime):
            ...     record = {"index": 0, "supervised_tokens": 1, "correct_tokens": 1,
            ...               "exact": True, "nll": 0.0}
            ...     return RecordsFile("val", step, "step", None,
            ...                        Path(f"val_step{step:07d}.jsonl"), [record], mtime)
            >>> (series,) = group_series([file(100, 10.0), file(200, 20.0), file(100, 90.0)])
            >>> first, second = series.eval_sets[0].runs
            >>> print(series.eval_sets[0].same_run(first.files[1], second.files[0]))
            step 200 is of run 1 and step 100 of run 2: two runs wrote into this folder
        """
        one, two = self.run_of(before), self.run_of(after)
        if one is two:
            return None
        return (
            f"{before.moment} is of run {one.number} and {after.moment} of run {two.number}: "
            "two runs wrote into this folder"
        )


@dataclass
class Series:
    """The records files of one stage, dataloader and kind of counter.

    Attributes:
        stage: ``val``, ``test``, ``eval``...
        dataloader: the ``N`` of ``_dl{N}``; None without the suffix.
        kind: ``"step"``, or ``"call"`` when the writer did not know the step.
        eval_sets: the evaluations split by the samples they hold (usually one).
        notes: what the report must say about them: several eval sets, several runs.
    """

    stage: str
    dataloader: int | None
    kind: str
    eval_sets: list[EvalSet]
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        """``"val"``, ``"val, dataloader 1"``, ``"eval (by evaluation call: ...)"``."""
        title = self.stage
        if self.dataloader is not None:
            title += f", dataloader {self.dataloader}"
        if self.kind == "call":
            title += " (by evaluation call: the step was unknown)"
        return title

    @property
    def files(self) -> list[RecordsFile]:
        """Every evaluation of every eval set."""
        return [file for eval_set in self.eval_sets for file in eval_set.files]


@dataclass
class Flips:
    """The samples whose ``exact`` changed between two evaluations of one eval set.

    Attributes:
        before: the earlier evaluation.
        after: the later one.
        lost: right -> wrong, as the records of ``after``, by index.
        gained: wrong -> right, as the records of ``after``, by index.
    """

    before: RecordsFile
    after: RecordsFile
    lost: list[dict[str, Any]]
    gained: list[dict[str, Any]]


@dataclass
class FlipChoice:
    """The two evaluations an eval set's flips compare by default, or why there are none.

    Attributes:
        flips: the flips between the last two evaluations of the latest run that has two
            (:func:`default_flips`); None when there is none.
        note: why there are no flips, or which two evaluations were chosen when the choice is
            not the obvious one (several runs); empty otherwise.
    """

    flips: Flips | None
    note: str


# ---- identity ----------------------------------------------------------------------------------


def _sample(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """What says which sample a record is about (the model's answer excluded)."""
    group = record.get("group")
    return (
        record["supervised_tokens"],
        record.get("reference"),
        None if group is None else str(group),
    )


_FIELDS = ("supervised tokens", "reference", "group")


def _identity(file: RecordsFile) -> tuple[tuple[Any, ...], ...]:
    return tuple((record["index"], *_sample(record)) for record in file.records)


def _checked(files: Sequence[RecordsFile]) -> tuple[str, ...]:
    present = {
        name
        for file in files
        for record in file.records
        for name, key in (("reference", "reference"), ("group", "group"))
        if record.get(key) is not None
    }
    return ("supervised tokens", *(name for name in _FIELDS[1:] if name in present))


def difference(before: RecordsFile, after: RecordsFile) -> str | None:
    """How the samples of two evaluations differ, or None when they are the same eval set.

    The same eval set means the same indexes, each with the same number of supervised tokens,
    the same ``reference`` and the same ``group`` (null where a record has none).

    Args:
        before: one evaluation.
        after: another.

    Returns:
        None, or a sentence that gives the counts and a first example.

    Examples:
        >>> from pathlib import Path
        >>> def file(step, references):
        ...     records = [{"index": i, "supervised_tokens": 3, "correct_tokens": 3,
        ...                 "exact": True, "nll": 0.0, "reference": text}
        ...                for i, text in enumerate(references)]
        ...     return RecordsFile("val", step, "step", None, Path("-"), records)
        >>> print(difference(file(100, ["011", "110"]), file(200, ["011", "101"])))
        1 of the 2 indexes hold another sample (index 1: reference "110" at step 100, "101" at step 200)
        >>> print(difference(file(100, ["011", "110"]), file(200, ["011", "110", "000"])))
        step 100 holds 2 samples and step 200 holds 3 (index 2 only at step 200)
        >>> difference(file(100, ["011"]), file(200, ["011"])) is None
        True
    """  # noqa: E501
    if _identity(before) == _identity(after):
        return None
    one = {record["index"]: record for record in before.records}
    two = {record["index"]: record for record in after.records}
    parts = []
    only = [(index, before) for index in sorted(one.keys() - two.keys())]
    only += [(index, after) for index in sorted(two.keys() - one.keys())]
    if len(one) != len(two) or only:
        text = f"{before.moment} holds {len(one)} samples and {after.moment} holds {len(two)}"
        if only:
            index, where = only[0]
            text += f" (index {index} only at {where.moment})"
        parts.append(text)
    shared = sorted(one.keys() & two.keys())
    differing = [index for index in shared if _sample(one[index]) != _sample(two[index])]
    if differing:
        index = differing[0]
        a, b = _sample(one[index]), _sample(two[index])
        name, x, y = next((n, x, y) for n, x, y in zip(_FIELDS, a, b) if x != y)
        parts.append(
            f"{len(differing)} of the {len(shared)} indexes hold another sample (index {index}: "
            f"{name} {_quote(x, _QUOTE)} at {before.moment}, {_quote(y, _QUOTE)} at {after.moment})"
        )
    return "; ".join(parts)


# ---- grouping ----------------------------------------------------------------------------------


def _moments(files: Sequence[RecordsFile]) -> str:
    """``"step 300"``, ``"steps 100, 200, 300"``, ``"21 steps, 0 to 1000"``, ``"calls 1, 3"``."""
    kind = "step" if files[0].kind == "step" else "call"
    numbers = [str(file.step) for file in files]
    if len(numbers) == 1:
        return f"{kind} {numbers[0]}"
    if len(numbers) > _MAX_LISTED:
        return f"{len(numbers)} {kind}s, {numbers[0]} to {numbers[-1]}"
    return f"{kind}s {', '.join(numbers)}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _split_runs(files: Sequence[RecordsFile]) -> tuple[list[Run], list[str]]:
    """The runs of one eval set's files, and why each run after the first starts."""
    # Write order; without modification times (0.0), the order of the steps.
    order = sorted(files, key=lambda f: (f.mtime or 0.0, f.step, f.repeat, f.path.name))
    last_repeat: dict[int, int] = {}
    times_are_write_order = True
    for file in order:
        times_are_write_order &= file.repeat >= last_repeat.get(file.step, 0)
        last_repeat[file.step] = file.repeat
    if not times_are_write_order:
        # A `-N` file (the N-th evaluation at its step in this folder) came before an earlier
        # one: the times are a copy's, not the writer's. The suffixes are the write order.
        order = sorted(files, key=lambda f: (f.repeat, f.step, f.path.name))
    groups: list[list[RecordsFile]] = []
    reasons = []
    previous: RecordsFile | None = None
    for file in order:
        current = groups[-1] if groups else None
        again = next((f for f in current or () if f.step == file.step), None)
        restart = (
            times_are_write_order
            and previous is not None
            and file.step < previous.step
            and (file.mtime or 0.0) - (previous.mtime or 0.0) > WRITE_ORDER_SLACK_S
        )
        if current is None or again is not None or restart:
            if current is not None:
                number = len(groups) + 1
                if again is not None:
                    reasons.append(
                        f"run {number} starts with step {file.step} again ({file.path.name}, "
                        f"after {again.path.name}): a rerun into this folder, or a second "
                        "evaluation at the same step (e.g. validate() after fit())"
                        if file.kind == "step"
                        else f"run {number} starts with call {file.step} again "
                        f"({file.path.name}, after {again.path.name}): the counter restarted"
                    )
                else:
                    assert previous is not None
                    gap = (file.mtime or 0.0) - (previous.mtime or 0.0)
                    reasons.append(
                        f"run {number} starts at {file.moment} ({file.path.name}), written "
                        f"{_duration(gap)} after {previous.moment} ({previous.path.name}), "
                        "so the steps restart"
                    )
            groups.append([file])
        else:
            current.append(file)
        previous = file
    runs = [
        Run(number, sorted(group, key=lambda f: (f.step, f.repeat, f.path.name)))
        for number, group in enumerate(groups, start=1)
    ]
    if not times_are_write_order:
        reasons.append(
            "the files' modification times contradict their -N suffixes (a copy that did not "
            "keep them?), so the suffixes alone order the files, and a step written only once "
            "is taken as the first run's"
        )
    return runs, reasons


def group_series(files: Sequence[RecordsFile]) -> list[Series]:
    """Sort records files into series, each split into eval sets and runs.

    Args:
        files: what :func:`~mllm_metrics.report.records.load_records` returned (any order).

    Returns:
        The series, sorted by stage, dataloader (none first) and kind, each with the notes the
        report must show (empty when the series is one eval set written by one run).

    Examples:
        >>> from pathlib import Path
        >>> def file(step, reference, mtime):
        ...     record = {"index": 0, "supervised_tokens": 3, "correct_tokens": 3,
        ...               "exact": True, "nll": 0.0, "reference": reference}
        ...     return RecordsFile("val", step, "step", None,
        ...                        Path(f"val_step{step:07d}.jsonl"), [record], mtime)
        >>> (series,) = group_series([file(100, "011", 1.0), file(200, "011", 2.0),
        ...                           file(150, "110", 3.0)])
        >>> [[f.step for f in s.files] for s in series.eval_sets]
        [[100, 200], [150]]
        >>> print(series.notes[0])  # doctest: +NORMALIZE_WHITESPACE
        these records hold 2 different eval sets: eval set 1 (steps 100, 200; 1 sample),
        eval set 2 (step 150; 1 sample); step 150 against step 100: 1 of the 1 indexes hold
        another sample (index 0: reference "011" at step 100, "110" at step 150). The same
        index is another sample in each, so two runs (or two configurations) likely wrote
        into this folder. Each eval set is reported apart, and no flip is counted across them.
    """
    by_series: dict[tuple[str, int | None, str], list[RecordsFile]] = {}
    for file in files:
        by_series.setdefault(file.series, []).append(file)
    result = []
    for key in sorted(by_series, key=lambda k: (k[0], _dataloader_key(k[1]), k[2])):
        members = sorted(by_series[key], key=lambda f: (f.step, f.repeat, f.path.name))
        clusters: dict[tuple[Any, ...], list[RecordsFile]] = {}
        for file in members:  # dicts keep the order: eval sets by their first step
            clusters.setdefault(_identity(file), []).append(file)
        stage, dataloader, kind = key
        series = Series(stage, dataloader, kind, [])
        groups = list(clusters.values())
        for number, group in enumerate(groups, start=1):
            runs, reasons = _split_runs(group)
            series.eval_sets.append(EvalSet(number, len(groups), runs, _checked(group)))
            if reasons:
                which = f"eval set {number}: " if len(groups) > 1 else ""
                listed = "; ".join(f"run {run.number}: {_moments(run.files)}" for run in runs)
                series.notes.append(
                    f"{which}these evaluations come from {len(runs)} runs that wrote into one "
                    f"folder: {'; '.join(reasons)}. R{listed[1:]}. Each run is listed apart, "
                    "and flips compare two evaluations of one run only."
                )
        if len(groups) > 1:
            listed = ", ".join(
                f"eval set {number} ({_moments(group)}; {_count(len(group[0].records))})"
                for number, group in enumerate(groups, start=1)
            )
            first = groups[0][0]
            why = "; ".join(
                f"{g[0].moment} against {first.moment}: {difference(first, g[0])}"
                for g in groups[1:]
            )
            series.notes.insert(
                0,
                f"these records hold {len(groups)} different eval sets: {listed}; {why}. The "
                "same index is another sample in each, so two runs (or two configurations) "
                "likely wrote into this folder. Each eval set is reported apart, and no flip is "
                "counted across them.",
            )
        result.append(series)
    return result


def _count(samples: int) -> str:
    return f"{samples} sample" + ("" if samples == 1 else "s")


def comparable_text(eval_set: EvalSet, samples: int) -> str:
    """What makes two evaluations of ``eval_set`` comparable, for the flips' heading.

    Args:
        eval_set: one eval set of a :class:`Series`.
        samples: how many samples it holds.

    Returns:
        A phrase: the fields compared per index, and a caution when there was no reference.

    Examples:
        >>> print(comparable_text(EvalSet(1, 1, [], ("supervised tokens", "reference")), 3))
        the same 3 indexes, each with the same supervised tokens and reference
        >>> print(comparable_text(EvalSet(1, 1, [], ("supervised tokens",)), 3))
        the same 3 indexes, each with the same supervised tokens (no reference text to compare: another eval set of the same size and answer lengths would pass)
    """  # noqa: E501
    checked = list(eval_set.checked)
    listed = checked[0] if len(checked) == 1 else ", ".join(checked[:-1]) + f" and {checked[-1]}"
    text = f"the same {samples} indexes, each with the same {listed}"
    if "reference" not in checked:
        text += (
            " (no reference text to compare: another eval set of the same size and answer "
            "lengths would pass)"
        )
    return text


# ---- flips -------------------------------------------------------------------------------------


def flips(before: RecordsFile, after: RecordsFile) -> Flips:
    """The samples whose ``exact`` went from true to false, and from false to true.

    Args:
        before: the earlier evaluation.
        after: the later evaluation, of the same eval set (see :func:`difference`).

    Returns:
        The :class:`Flips`; a sample whose ``exact`` is null on either side is no flip.

    Raises:
        ValueError: when the two evaluations are not of the same eval set: matching them by
            index would compare different samples.

    Examples:
        >>> from pathlib import Path
        >>> def file(step, exact):
        ...     records = [{"index": i, "supervised_tokens": 2, "correct_tokens": 2 * e,
        ...                 "exact": e, "nll": 0.0} for i, e in enumerate(exact)]
        ...     return RecordsFile("val", step, "step", None, Path("-"), records)
        >>> result = flips(file(100, [True, False, True]), file(200, [False, True, True]))
        >>> [r["index"] for r in result.lost], [r["index"] for r in result.gained]
        ([0], [1])
    """
    problem = difference(before, after)
    if problem is not None:
        raise ValueError(
            f"Cannot compare {before.path.name} with {after.path.name} sample by sample: they "
            f"hold different eval sets ({problem}); the same index is another sample."
        )
    was = {record["index"]: record["exact"] for record in before.records}
    lost, gained = [], []
    for record in after.records:
        then, now = was[record["index"]], record["exact"]
        if then is True and now is False:
            lost.append(record)
        elif then is False and now is True:
            gained.append(record)
    return Flips(before, after, lost, gained)


def default_flips(eval_set: EvalSet) -> FlipChoice:
    """The flips between the last two evaluations of the latest run that has two.

    Usually the last two steps. With several runs, the run that wrote last when it has two
    evaluations, else the latest one that has (a rerun that has evaluated once so far, a second
    evaluation at the last step); evaluations of different runs are never compared.

    Args:
        eval_set: one eval set of a :class:`Series`.

    Returns:
        The :class:`FlipChoice`: the flips, or None with the reason.
    """
    several = len(eval_set.runs) > 1
    with_two = [run for run in eval_set.runs if len(run.files) >= 2]
    if with_two:
        run, latest = with_two[-1], eval_set.runs[-1]
        note = ""
        if several:
            note = f"these are the last two evaluations of run {run.number}"
            if run is latest:
                note += ", the run that wrote last"
            else:
                note += (
                    f"; run {latest.number}, which wrote last, has a single evaluation "
                    f"({latest.files[0].moment})"
                )
            note += "; evaluations of different runs are not compared"
        return FlipChoice(flips(run.files[-2], run.files[-1]), note)
    last = eval_set.last
    if several:
        return FlipChoice(
            None,
            f"no run has two evaluations of this eval set (each of its {len(eval_set.runs)} "
            "runs has one): no flips to compare; evaluations of different runs are not "
            "compared, as a change between them is no change of one model's mind",
        )
    word = "step" if last.kind == "step" else "evaluation"
    return FlipChoice(None, f"Only one {word} ({last.moment}): no flips to compare.")
