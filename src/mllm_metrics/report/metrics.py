"""The aggregates of per-sample records: overall, per group and the macro average.

Ratios are ratios of sums, as the streaming metrics compute them (tokens weigh, not samples), so
the report agrees with the logged ``bit_match``, ``exact_match`` and ``loss``.

Only the standard library is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Metrics", "Summary", "has_error", "nll_value", "share", "summarize"]


@dataclass(frozen=True)
class Metrics:
    """The aggregates of a set of samples; a ratio with nothing to count is ``nan``.

    Attributes:
        samples: how many samples (for ``macro``: the samples of the groups averaged).
        bit_match: correct tokens over supervised tokens.
        exact_match: samples with ``exact`` true over samples with ``exact`` not null.
        nll: summed NLL over supervised tokens (the mean token NLL, as ``val/loss``).
        gen_exact_match: the same as ``exact_match`` for ``gen_exact``; nan when absent.
        correct_tokens: the correct tokens summed (0 for ``macro``).
        supervised_tokens: the supervised tokens summed (0 for ``macro``).
    """

    samples: int
    bit_match: float
    exact_match: float
    nll: float
    gen_exact_match: float = math.nan
    correct_tokens: int = 0
    supervised_tokens: int = 0


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


def share(record: Mapping[str, Any]) -> float:
    """The share of a sample's supervised tokens that are correct; nan without any.

    Examples:
        >>> share({"supervised_tokens": 4, "correct_tokens": 3}), share(
        ...     {"supervised_tokens": 0, "correct_tokens": 0})
        (0.75, nan)
    """
    return _ratio(record["correct_tokens"], record["supervised_tokens"])


def has_error(record: Mapping[str, Any]) -> bool:
    """Whether a sample has a supervised token that was predicted wrong (teacher-forced).

    Examples:
        >>> has_error({"supervised_tokens": 4, "correct_tokens": 3})
        True
        >>> has_error({"supervised_tokens": 0, "correct_tokens": 0})
        False
    """
    return record["correct_tokens"] < record["supervised_tokens"]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _share_true(records: Sequence[Mapping[str, Any]], key: str) -> float:
    counted = [record[key] for record in records if record.get(key) is not None]
    return _ratio(sum(counted), len(counted))


def nll_value(record: Mapping[str, Any]) -> float:
    """A record's summed NLL, nan when it was not computed (``"nll": null``)."""
    nll = record["nll"]
    return math.nan if nll is None else float(nll)


def _metrics(records: Sequence[Mapping[str, Any]]) -> Metrics:
    supervised = sum(record["supervised_tokens"] for record in records)
    correct = sum(record["correct_tokens"] for record in records)
    return Metrics(
        samples=len(records),
        bit_match=_ratio(correct, supervised),
        exact_match=_share_true(records, "exact"),
        nll=_ratio(sum(nll_value(record) for record in records), supervised),
        gen_exact_match=_share_true(records, "gen_exact"),
        correct_tokens=correct,
        supervised_tokens=supervised,
    )


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

    Examples:
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
