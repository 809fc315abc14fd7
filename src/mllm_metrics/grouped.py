"""Per-group values of a token metric inside one mixed eval set (VQA, OCR, captions...).

:class:`GroupedMetric` keeps one slot per group in each of its two sum states, so its states
have a fixed shape, ``(num_groups,)``, and every process's sums add up with one all-reduce each,
however the samples of each group fall across processes and batches.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from mllm_metrics.functional import _is_signed_integer, _ratio
from mllm_metrics.metrics import _SumStates, _TokenCountRatio

__all__ = ["MACRO", "GroupedMetric", "group_ids", "groups_checksum"]

#: The key of the mean over the groups that have data, next to the groups' own keys.
MACRO = "macro"


def _check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TypeError(
            f"Expected `groups` to be a sequence of group names (str), got {type(groups).__name__}."
        )
    names = tuple(groups)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"Expected `groups` to be non-empty strings, got {list(names)!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Expected distinct group names, got {list(names)!r}.")
    if MACRO in names:
        raise ValueError(
            f"{MACRO!r} cannot be a group name: it is the key of the mean over the groups."
        )
    return names


def groups_checksum(groups: Sequence[str]) -> int:
    """A checksum of the group names in their order: what must be equal on every process."""
    return zlib.crc32("\x1f".join(groups).encode())


def different_groups_message(groups: Sequence[str]) -> str:
    """The error when the processes list other groups, or the same in another order."""
    return (
        f"The processes do not list the same groups in the same order (this one: "
        f"{list(groups)!r}): a group's position would mean another group on another process, "
        "and every per-group value would be scrambled. Likely cause: `groups=list(set(names))` "
        "(each process has its own string hash seed); pass `sorted(set(names))` or a fixed list."
    )


def group_ids(
    group: Sequence[str] | Tensor, groups: Sequence[str], rows: int, device: torch.device
) -> Tensor:
    """Each row's position in ``groups``, an int64 tensor (rows,) on ``device``.

    Args:
        group: one entry per row: a group name, or an integer tensor of positions in ``groups``.
        groups: the group names.
        rows: the number of rows the batch has.
        device: where the ids are needed.

    Raises:
        ValueError: for a value not in ``groups`` or a length other than ``rows``.
        TypeError: for anything else than a list of str or an integer tensor.

    Examples:
        >>> group_ids(["ocr", "vqa", "ocr"], ["vqa", "ocr"], 3, torch.device("cpu"))
        tensor([1, 0, 1])

    """
    if isinstance(group, Tensor):
        if group.device.type == "meta":
            raise ValueError(
                f"Got the group of each row as a tensor on the meta device (shape "
                f"{tuple(group.shape)}): it holds no values. Likely cause: it was built under "
                "`torch.device('meta')` or from a model's meta-initialised buffers; pass the "
                "positions as a real tensor, or the group names."
            )
        if not _is_signed_integer(group) or group.ndim != 1:
            raise TypeError(
                "Expected the group of each row as a list of group names or a 1-D integer "
                f"tensor of positions in `groups`, got a tensor of shape {tuple(group.shape)} "
                f"and dtype {group.dtype}."
            )
        ids = group.to(device=device, dtype=torch.long)
        bad = (ids < 0) | (ids >= len(groups))
        if len(ids) == rows and bad.any():
            raise ValueError(
                f"Got the group position {int(ids[bad][0])}, outside the {len(groups)} groups "
                f"{list(groups)!r}."
            )
    elif isinstance(group, Sequence) and not isinstance(group, str):
        if any(isinstance(value, int) for value in group):
            raise TypeError(
                "Got group positions as a list of ints: pass them as an integer tensor (B,), "
                "or pass the group names."
            )
        position = {name: i for i, name in enumerate(groups)}
        unknown = [value for value in group if value not in position]
        if unknown:
            raise ValueError(
                f"Got the group {unknown[0]!r}, which is not one of the groups {list(groups)!r}. "
                "Likely cause: `groups` does not list every group of the eval set."
            )
        ids = torch.tensor([position[value] for value in group], dtype=torch.long, device=device)
    else:
        raise TypeError(
            "Expected the group of each row as a list of group names or a 1-D integer tensor "
            f"of positions in `groups`, got {type(group).__name__}."
        )
    if len(ids) != rows:
        raise ValueError(
            f"Got groups for {len(ids)} rows, but the batch has {rows} rows: each row needs its "
            "group. Likely cause: a collate function that builds the group column from other "
            "rows than the tensors (or a model that adds or drops rows)."
        )
    return ids


class GroupedMetric(_SumStates):
    r"""A token metric's value for each group of samples, and their mean, streamed and DDP-exact.

    Wraps :class:`~mllm_metrics.BitMatchAccuracy`, :class:`~mllm_metrics.ExactMatchAccuracy` or
    :class:`~mllm_metrics.TokenNLL`: each group's value is the wrapped metric computed on that
    group's rows alone, and ``"macro"`` is the mean of those values over the groups that have
    data (rows with a supervised position).

    As input to ``forward`` and ``update`` the metric accepts what the wrapped metric accepts
    (``preds``, ``target``) and ``group``: one entry per row, a list of group names or an int
    tensor ``(B,)`` of positions in ``groups``. An unknown group raises and changes nothing.

    As output of ``compute`` the metric returns a dict of float scalar tensors: one per group
    that has data (a supervised position; "no data, no number": a group without any is left
    out), and ``"macro"``, the mean over those groups (``zero_division`` when none has data).

    States: the wrapped metric's two state names with ``_per_group_`` and a checksum of the group
    names appended (e.g. ``bit_match_correct_per_group_1f2e3d4c``), each of shape
    ``(num_groups,)``, summed across processes; :attr:`sums` reads them.

    Args:
        metric: the metric to compute per group (its ``ignore_index``, ``zero_division`` and
            ``validate_args`` are used); it is not updated itself.
        groups: the group names, in the order of the positions a tensor ``group`` holds.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> import torch
        >>> from mllm_metrics import BitMatchAccuracy, GroupedMetric
        >>> metric = GroupedMetric(BitMatchAccuracy(), groups=["vqa", "ocr", "caption"])
        >>> preds = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
        >>> target = torch.tensor([[1, 2, 0], [4, 5, 6], [7, -100, 0]])
        >>> metric.update(preds, target, group=["vqa", "ocr", "vqa"])
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'vqa': 0.6, 'ocr': 1.0, 'macro': 0.8}

    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, metric: _TokenCountRatio, groups: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(metric, _TokenCountRatio):
            raise TypeError(
                "Expected `metric` to be a BitMatchAccuracy, ExactMatchAccuracy or TokenNLL, "
                f"got {type(metric).__name__}."
            )
        self.groups = _check_groups(groups)
        # Kept out of the module tree: only its rules and arguments are used, never its states.
        self._metric = (metric,)
        size = len(self.groups)
        # The group names are part of the state names: a MetricCollection merges metrics whose
        # states have the same names and values into one compute group, which must never happen
        # to two groupings of different groups (or of the same groups in another order).
        names = groups_checksum(self.groups)
        self._numerator_state = f"{metric._numerator_state}_per_group_{names:08x}"
        self._denominator_state = f"{metric._denominator_state}_per_group_{names:08x}"
        self._checked_across_processes = False
        numerator = torch.zeros(size, dtype=metric._numerator_dtype)
        self.add_state(self._numerator_state, numerator, dist_reduce_fx="sum")
        self.add_state(self._denominator_state, torch.zeros(size, dtype=torch.long), "sum")

    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None
    ) -> None:
        """Sum the states over the processes; the first time, check that every process names
        the groups in the same order (a slot means the same group everywhere)."""
        if not self._checked_across_processes:
            mine = groups_checksum(self.groups)
            checksum = torch.tensor(mine, dtype=torch.long, device=self.device)
            gathered = dist_sync_fn(checksum, group=process_group or self.process_group)
            if any(int(value) != mine for value in gathered):
                raise ValueError(different_groups_message(self.groups))
            self._checked_across_processes = True
        super()._sync_dist(dist_sync_fn, process_group)

    @property
    def sums(self) -> tuple[Tensor, Tensor]:
        """The two sum states, numerator and denominator, one slot per group."""
        return getattr(self, self._numerator_state), getattr(self, self._denominator_state)

    @property
    def metric(self) -> _TokenCountRatio:
        """The wrapped metric, whose rules are applied per group."""
        return self._metric[0]

    def update(self, preds: Tensor, target: Tensor, group: Sequence[str] | Tensor) -> None:
        """Add each row's counts to its group's slot."""
        self.metric._check(preds, target)
        ids = group_ids(group, self.groups, target.shape[0], target.device)
        self._add_rows(*self.metric._row_sums(preds, target), ids)

    def _update_rows(self, numerators: Tensor, denominators: Tensor, ids: Tensor) -> None:
        """Add per-row sums computed elsewhere (e.g. by the chunked head), as one update."""
        self._count_external_update()
        self._add_rows(numerators, denominators, ids)

    def _add_rows(self, numerators: Tensor, denominators: Tensor, ids: Tensor) -> None:
        numerator = getattr(self, self._numerator_state)
        denominator = getattr(self, self._denominator_state)
        # Out of place, as in `_CountRatio._add`: both sums are computed before either changes.
        numerator = numerator.index_add(0, ids, numerators.to(numerator.dtype))
        denominator = denominator.index_add(0, ids, denominators.long())
        setattr(self, self._numerator_state, numerator)
        setattr(self, self._denominator_state, denominator)

    def compute(self) -> dict[str, Tensor]:
        """The value of each group that has data, and ``"macro"``, their mean."""
        numerator = getattr(self, self._numerator_state)
        denominator = getattr(self, self._denominator_state)
        zero_division = self.metric.zero_division
        values = _ratio(numerator, denominator, zero_division)
        has_data = denominator > 0
        macro = _ratio(values.double().where(has_data, 0.0).sum(), has_data.sum(), zero_division)
        kept = has_data.tolist()
        return {
            name: value for name, value, keep in zip(self.groups, values.unbind(), kept) if keep
        } | {MACRO: macro}


class _GroupValue(_SumStates):
    """One value of a :class:`GroupedMetric` as a metric object Lightning can log.

    It has no state of its own: its ``compute()`` is the grouped metric's (synced once, then
    cached by torchmetrics until the next update or reset) at ``key``.
    """

    full_state_update = False

    def __init__(self, grouped: GroupedMetric, key: str) -> None:
        super().__init__()
        self._grouped = (grouped,)  # not a child: its states are logged through this value only
        self.key = key

    def update(self) -> None:
        """Nothing to add: the grouped metric is updated."""

    def compute(self) -> Tensor:
        """The grouped metric's value at ``key``."""
        return self._grouped[0].compute()[self.key]
