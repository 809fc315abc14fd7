"""Which sample each row of an evaluation batch is, and which rows are a padding
``DistributedSampler``'s repeated samples.

``DistributedSampler(drop_last=False)`` pads the index list with repeats so that every process
gets as many samples; counting those rows would count their samples twice. A repeat is
recognised by *what it is*: this process's share of the padding is a known set of dataset
indices (the sampler's own order for this epoch, from ``num_samples`` on), and each batch's
dataset indices are recorded as the loader draws them, whatever batch sampler (a reordering
one, ``batch_size=None`` over pre-collated items), shuffling or worker count sits in between.
A row is a repeat exactly when its index is in that set (a padding index never also reaches the
same process as a real sample).

The same record gives each real sample its data-set index (the value its index sampler
yielded; with pre-collated items, ``batch_size=None``, the item's index and the row within it),
on one process as on several: per-sample records are sorted by it, so the files of 1 and of N
processes are the same, whatever batch sampler reorders the batches.

:func:`track_repeats` returns a shallow copy of an evaluation ``DataLoader`` whose index
sampler records; the user's loader is left as it is. Where repeats cannot be identified, or
the loader drops samples, it warns once with the cause and what to change.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from mllm_metrics._warning import MllmMetricsWarning

__all__ = [
    "BatchSamples",
    "RepeatTracker",
    "distributed_sampler_of",
    "track_repeats",
    "tracker_of",
]

_EXACTNESS = "so the metrics synced over the processes may not equal a single-process run exactly"


def _warn(message: str) -> None:
    warnings.warn(message, MllmMetricsWarning, stacklevel=3)


def _quiet(message: str) -> None:
    """On one process nothing is repeated: a loader whose samples are unknown is numbered as
    its batches arrive, which is its order."""


def distributed_sampler_of(loader: object) -> DistributedSampler | None:
    """The ``DistributedSampler`` of ``loader``: its sampler, or the one its batch sampler holds."""
    tracker = tracker_of(loader)
    if tracker is not None:
        return tracker.sampler
    if not isinstance(loader, DataLoader):
        return None
    candidates = [loader.sampler, loader.batch_sampler]
    if loader.batch_sampler is not None:
        candidates += list(vars(loader.batch_sampler).values())
    return next((c for c in candidates if isinstance(c, DistributedSampler)), None)


def _rank_order(sampler: DistributedSampler) -> list[Any] | None:
    """The dataset indices this process's sampler yields this epoch, without drawing them.

    ``DistributedSampler.__iter__`` is a pure function of (seed, epoch, dataset length). Lightning's
    ``DistributedSamplerWrapper`` maps those positions through the list its inner sampler drew
    for this epoch. Another subclass may order its indices otherwise: None.
    """
    positions = list(DistributedSampler.__iter__(sampler))
    if type(sampler).__iter__ is DistributedSampler.__iter__:
        return positions
    try:
        from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    except ImportError:  # pragma: no cover - lightning is installed wherever this is used
        return None
    if isinstance(sampler, DistributedSamplerWrapper):
        return [sampler.dataset[position] for position in positions]
    return None


class _RecordingIndexSampler(Sampler):
    """Passes a loader's index sampler through unchanged, recording what each batch is made of.

    The loader iterates its index sampler in this process, also with worker processes, and
    delivers the batches in that order (``in_order=True``, the default), so the k-th recorded
    entry belongs to the k-th batch. Each ``iter()`` starts a new record.
    """

    def __init__(self, index_sampler: Any, tracker: RepeatTracker) -> None:
        self.index_sampler = index_sampler
        self.tracker = tracker

    def __iter__(self) -> Iterator[Any]:
        record = self.tracker._start()
        began = False
        for entry in self.index_sampler:
            if not began:  # the sampler has begun this iteration: its padding is now fixed
                began = True
                self.tracker._fix_repeats()
            record.append(entry)
            yield entry

    def __len__(self) -> int:
        return len(self.index_sampler)

    def __getattr__(self, name: str) -> Any:  # batch_size, drop_last, sampler, set_epoch...
        if name in ("index_sampler", "tracker"):
            raise AttributeError(name)
        return getattr(self.index_sampler, name)


class BatchSamples(NamedTuple):
    """What :meth:`RepeatTracker.next_batch` knows of one batch's rows."""

    #: Per row, its place in the data set, ``(index, row)``: ``index`` is the data-set index the
    #: loader's index sampler yielded for it, ``row`` its row within a pre-collated item (0
    #: otherwise); None where unknown, and for a repeat.
    keys: list[tuple[Any, int] | None] | None
    #: Per row, whether it is a repeated sample; None when no row is (or it is unknown).
    repeated: list[bool] | None


class RepeatTracker:
    """Knows, for each batch of one evaluation loader, which data-set samples its rows are and
    which of them a padding ``DistributedSampler`` repeated.

    Created by :func:`track_repeats`. :meth:`next_batch` is called once per batch, in order.
    """

    def __init__(self, sampler: DistributedSampler | None, batched: bool, description: str) -> None:
        #: The loader's DistributedSampler; None on one process (nothing is repeated then).
        self.sampler = sampler
        self.batched = batched
        self.description = description
        self._record: deque[Any] = deque()
        self._repeats: frozenset[Any] | None = frozenset()
        self._warned = False

    def _start(self) -> deque[Any]:
        self._record = deque()
        self._repeats = frozenset() if self.sampler is None else None
        return self._record

    def _fix_repeats(self) -> None:
        """Read this iteration's padding from the sampler, once its iteration has begun (its
        epoch, and the order a wrapped sampler drew, are then those of the batches recorded);
        None when the sampler orders its indices in an unknown way."""
        if self.sampler is None:
            return
        order = _rank_order(self.sampler)
        if order is None:
            self._repeats = None
            return
        sampler = self.sampler
        real = max(0, -(-(len(sampler.dataset) - sampler.rank) // sampler.num_replicas))
        self._repeats = frozenset(order[real:])

    def _cannot_identify(self, cause: str) -> None:
        if not self._warned:
            self._warned = True
            _warn(
                f"{self.description}: {cause}; its repeated samples cannot be identified, "
                f"{_EXACTNESS}."
            )

    def next_batch(self, rows: int) -> BatchSamples:
        """Which samples the next batch's ``rows`` rows are, and which of them are repeats."""
        unknown = BatchSamples(None, None)
        if not self._record:
            if self.sampler is not None:
                self._cannot_identify(
                    "a batch arrived that the loader's index sampler did not record (was the "
                    "loader iterated before the evaluation started, or with `in_order=False`?)"
                )
            return unknown
        entry = self._record.popleft()
        repeats = self._repeats
        if repeats is None:
            self._cannot_identify(
                f"its sampler {type(self.sampler).__name__} overrides `__iter__`, so the order "
                "of its padding is unknown; use torch's `DistributedSampler`"
            )
            return unknown
        if not self.batched:  # `batch_size=None`: one index per item, a whole pre-collated batch
            if entry in repeats:
                return BatchSamples([None] * rows, [True] * rows)
            return BatchSamples([(entry, row) for row in range(rows)], None)
        entry = list(entry)
        if len(entry) != rows:
            if self.sampler is not None:
                self._cannot_identify(
                    f"a batch of {len(entry)} dataset indices became {rows} rows after collation"
                )
            return unknown
        flags = [index in repeats for index in entry]
        keys = [None if flag else (index, 0) for index, flag in zip(entry, flags)]
        return BatchSamples(keys, flags if any(flags) else None)


def tracker_of(loader: object) -> RepeatTracker | None:
    """The tracker of a loader returned by :func:`track_repeats`, or None."""
    for name in ("batch_sampler", "sampler"):
        index_sampler = getattr(loader, name, None)
        if isinstance(index_sampler, _RecordingIndexSampler):
            return index_sampler.tracker
    return None


def track_repeats(
    loader: object, description: str, distributed: bool = True
) -> tuple[object, RepeatTracker | None]:
    """Prepare an evaluation loader so that each batch's samples (and repeats) are known.

    Args:
        loader: the evaluation loader as the trainer will iterate it (its ``DistributedSampler``
            already in place when ``distributed``).
        description: how to name the loader in warnings, e.g. ``"val dataloader 0"``.
        distributed: the loader is one process's share of a distributed evaluation: its
            ``DistributedSampler`` pads it with repeats, and a loader whose repeats cannot be
            identified (or that drops samples) gets a warning. On one process, only the data-set
            indices are recorded, silently.

    Returns:
        ``(loader_to_iterate, tracker)``: a shallow copy of ``loader`` whose index sampler
        records each batch's dataset indices, and its tracker; or ``(loader, None)`` when they
        cannot be known (after a warning that says why, when ``distributed``).

    """
    warn = _warn if distributed else _quiet
    if not isinstance(loader, DataLoader):
        warn(f"{description} is a {type(loader).__name__}, not a DataLoader; {_EXACTNESS}.")
        return loader, None
    if isinstance(loader.dataset, IterableDataset):
        warn(
            f"{description} iterates an IterableDataset, whose shards across processes may "
            f"overlap or be uneven, {_EXACTNESS}. Give each process a disjoint shard, or use a "
            "map-style data set with a DistributedSampler."
        )
        return loader, None
    sampler = distributed_sampler_of(loader) if distributed else None
    if distributed and sampler is None:
        _warn(
            f"{description} has no DistributedSampler (its sampler is "
            f"{type(loader.sampler).__name__}), so each process may see the whole data set or "
            f"an unknown share of it, {_EXACTNESS}. Keep Lightning's default "
            "`use_distributed_sampler=True`, or pass a DistributedSampler."
        )
        return loader, None
    batch_sampler = loader.batch_sampler
    if sampler is not None:
        dataset_size = len(sampler.dataset)
        if sampler.drop_last and dataset_size % sampler.num_replicas:
            _warn(
                f"{description}'s DistributedSampler has `drop_last=True`: it leaves out "
                f"{dataset_size % sampler.num_replicas} of the {dataset_size} samples, "
                f"{_EXACTNESS}. Use `drop_last=False` for evaluation."
            )
        if batch_sampler is not None and getattr(batch_sampler, "drop_last", False):
            batch_size = getattr(batch_sampler, "batch_size", None)
            if not batch_size or sampler.num_samples % batch_size:
                _warn(
                    f"{description} drops its last incomplete batch (`drop_last=True`), leaving "
                    f"out samples, {_EXACTNESS}. Use `drop_last=False` for evaluation."
                )
    if getattr(loader, "in_order", True) is False and loader.num_workers > 0:
        warn(
            f"{description} has `in_order=False`: its workers may deliver batches out of order, "
            f"so repeated samples cannot be matched to their batches, {_EXACTNESS}."
        )
        return loader, None
    batched = batch_sampler is not None
    tracker = RepeatTracker(sampler, batched, description)
    tracked = copy.copy(loader)  # the user's loader keeps its own index sampler
    recording = _RecordingIndexSampler(batch_sampler if batched else loader.sampler, tracker)
    # DataLoader forbids setting its samplers after construction; this copy is ours.
    object.__setattr__(tracked, "batch_sampler" if batched else "sampler", recording)
    tracked._iterator = None  # a persistent-workers iterator would keep the old index sampler
    return tracked, tracker
