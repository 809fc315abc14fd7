"""Per-sample records of an evaluation: what the model got right and wrong, sample by sample.

One JSON Lines file per evaluation, one line per eval sample, in the data set's order::

    {"index": 3, "supervised_tokens": 9, "correct_tokens": 7, "exact": false, "nll": 3.21,
     "group": "ocr", "prediction": "0101", "reference": "0111"}

- ``index``: the sample's place in the data set's order (its data-set index when the whole data
  set is evaluated, one sample per index), the same on one process and on several, whatever
  sampler or batch sampler ordered the batches;
- ``supervised_tokens``, ``correct_tokens``: its supervised positions, and those predicted;
- ``exact``: whether all of them are, or null when it has none (it counts in no exact-match);
- ``nll``: the negative log-likelihood summed over its supervised tokens;
- ``group`` when the evaluation is grouped, ``prediction`` and ``reference`` (the decoded
  supervised spans) when a tokenizer is given, ``gen_exact`` and ``generated`` with generation.

Each process keeps only its own samples' few numbers (and strings) until the evaluation ends;
then process 0 gathers them, puts them in order and writes the file (whole, or not at all).
:mod:`mllm_metrics.report` reads a directory of such files.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mllm_metrics._warning import MllmMetricsWarning
from mllm_metrics.functional import _bit_match_rows, _exact_match_rows

__all__ = [
    "SampleRecords",
    "check_records_dir",
    "free_path",
    "records_file_name",
    "row_statistics",
    "write_records_file",
]

#: The fields every record has, first, in this order.
RECORD_FIELDS = ("index", "supervised_tokens", "correct_tokens", "exact", "nll")


def records_file_name(
    stage: str, step: int, dataloader_idx: int | None = None, counter: bool = False
) -> str:
    """The name of one evaluation's records file.

    Args:
        stage: ``"val"``, ``"test"``, or ``Trainer``'s ``metric_key_prefix`` (``"eval"``...).
        step: the global step the evaluation ran at, or a call counter.
        dataloader_idx: the dataloader, when the evaluation has several.
        counter: ``step`` is a call counter (the step is unknown).

    Examples:
        >>> records_file_name("val", 300), records_file_name("val", 300, dataloader_idx=1)
        ('val_step0000300.jsonl', 'val_step0000300_dl1.jsonl')
        >>> records_file_name("eval", 2, counter=True)
        'eval_call0000002.jsonl'

    """
    suffix = "" if dataloader_idx is None else f"_dl{dataloader_idx}"
    return f"{stage}_{'call' if counter else 'step'}{step:07d}{suffix}.jsonl"


def check_records_dir(path: Path) -> str | None:
    """Why records cannot be written to ``path`` (created if missing), or None when they can.

    Checked before an evaluation runs, so that a bad ``records_dir`` is an error at set-up,
    not a crash at the first evaluation after hours of training.
    """
    probe = Path(path) / f".mllm-metrics-write-check-{os.getpid()}"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        return (
            f"`records_dir` {str(path)!r} cannot be written: {error}. Per-sample records are "
            "written there after every evaluation; pass a directory this process can create and "
            "write, or `records_dir=None`."
        )
    return None


def free_path(path: Path) -> Path:
    """``path``, or ``<stem>-2.jsonl``, ``-3``... when an earlier evaluation wrote it (a second
    evaluation at the same step: ``validate()`` after ``fit()``, two eval sets, a rerun)."""
    candidate, repeat = path, 1
    while candidate.exists():
        repeat += 1
        candidate = path.with_name(f"{path.stem}-{repeat}{path.suffix}")
    return candidate


def row_statistics(
    preds: Tensor, target: Tensor, row_nll: Tensor | None, ignore_index: int
) -> dict[str, list[Any]]:
    """Each row's record fields (besides ``index``), by the same rules as the metrics.

    Args:
        preds: shifted token ids (B, L).
        target: shifted labels (B, L).
        row_nll: each row's summed NLL (B,), or None when it was not computed (``nll`` null).
        ignore_index: label of unsupervised positions.

    Returns:
        ``{"supervised_tokens": [...], "correct_tokens": [...], "exact": [...], "nll": [...]}``
        with one Python value per row (``exact`` is None for a row without supervised label).

    Examples:
        >>> preds = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> target = torch.tensor([[1, 2, 0], [-100, -100, -100]])
        >>> row_statistics(preds, target, torch.tensor([2.5, 0.0]), -100)
        {'supervised_tokens': [3, 0], 'correct_tokens': [2, 0], 'exact': [False, None], 'nll': [2.5, 0.0]}

    """  # noqa: E501
    correct, supervised = _bit_match_rows(preds, target, ignore_index)
    exact, counted = _exact_match_rows(preds, target, ignore_index)
    # One transfer to the host for the whole batch.
    columns = torch.stack([supervised, correct, exact, counted]).tolist()
    supervised_list, correct_list, exact_list, counted_list = columns
    return {
        "supervised_tokens": supervised_list,
        "correct_tokens": correct_list,
        "exact": [bool(hit) if has else None for hit, has in zip(exact_list, counted_list)],
        "nll": [None] * len(supervised_list) if row_nll is None else row_nll.double().tolist(),
    }


class SampleRecords:
    """One evaluation's per-sample records on this process, written by process 0 at its end.

    Each sample is kept as one small tuple: its place in the order (``key``, any sortable
    value) and its fields.

    Examples:
        >>> import tempfile
        >>> records = SampleRecords()
        >>> records.add([(1, 0), (0, 0)], {"supervised_tokens": [2, 3], "exact": [True, False]})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = records.write(Path(folder) / "val_step0000000.jsonl")
        ...     print(path.read_text(), end="")
        {"index": 0, "supervised_tokens": 3, "exact": false}
        {"index": 1, "supervised_tokens": 2, "exact": true}

    """

    def __init__(self) -> None:
        self._fields: tuple[str, ...] | None = None
        self._samples: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, keys: Sequence[Any], columns: dict[str, Sequence[Any]]) -> None:
        """Keep one batch's samples: their order ``keys`` and one list per field."""
        fields = tuple(columns)
        if self._fields is None:
            self._fields = fields
        elif fields != self._fields:
            raise ValueError(f"Records with fields {fields} after records with {self._fields}.")
        lengths = {len(values) for values in columns.values()} | {len(keys)}
        if len(lengths) != 1:
            raise ValueError(f"Got {len(keys)} keys for columns of lengths {sorted(lengths)}.")
        self._samples.extend(zip(keys, *columns.values()))

    def clear(self) -> None:
        """Forget every sample (a new evaluation starts)."""
        self._fields = None
        self._samples = []

    def truncate(self, length: int) -> None:
        """Forget the samples added after the first ``length`` (a batch that failed)."""
        del self._samples[length:]
        if not self._samples:
            self._fields = None

    def gather(self, gather: bool = True) -> list[dict[str, Any]] | None:
        """Every process's samples, in order, as records (``index`` first), on process 0.

        With ``gather`` every process must call this (it is a collective when
        ``torch.distributed`` is initialized); without, this process's samples are taken. The
        samples are then forgotten.

        Returns:
            the records on process 0 (or without ``gather``); None on the other processes.

        """
        fields, samples = self._fields, self._samples
        self.clear()
        if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if world > 1:
                gathered: list[Any] | None = [None] * world if rank == 0 else None
                torch.distributed.gather_object((fields, samples), gathered, dst=0)
                if rank != 0:
                    return None
                assert gathered is not None
                fields = next((f for f, _ in gathered if f is not None), None)
                samples = [sample for _, part in gathered for sample in part]
        samples.sort(key=lambda sample: sample[0])
        names = ("index", *(fields or ()))
        return [dict(zip(names, (index, *values))) for index, (_, *values) in enumerate(samples)]

    def write(self, path: Path, gather: bool = True) -> Path | None:
        """Gather every process's samples on process 0 and write them there, in order.

        With ``gather`` every process must call this (see :meth:`gather`). A file is never
        overwritten: when ``path`` exists (a second evaluation at the same step),
        ``<stem>-2.jsonl`` is written, and so on. A write that fails (a full disk) leaves no
        partial file and warns instead of raising.

        Returns:
            the path written, on the process that wrote it; None on the others or on failure.

        """
        records = self.gather(gather)
        return None if records is None else write_records_file(path, records)


def write_records_file(path: Path, records: Sequence[dict[str, Any]]) -> Path | None:
    """Write ``records`` as JSON Lines at ``path`` (or ``<stem>-2.jsonl``... when it exists),
    whole or not at all; on an error (a full disk), warn and return None.

    Returns:
        the path written, or None.

    """
    path = free_path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, path)  # a reader never sees half a file
    except OSError as error:
        partial.unlink(missing_ok=True)
        warnings.warn(
            f"The records of this evaluation could not be written to {path} ({error}); the "
            "metrics are not affected. Free some space or choose another `records_dir`.",
            category=MllmMetricsWarning,
            stacklevel=3,
        )
        return None
    return path
