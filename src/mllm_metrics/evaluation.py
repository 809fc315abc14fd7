"""The one evaluation core: every per-batch rule and every state, for both shells.

What a batch contributes to an evaluation is decided here, once: the token metrics, the NLL,
the per-group values, the metrics of the decoded text, the free-running (generated) answers and
the per-sample records. The Lightning module (:mod:`mllm_metrics.lightning`) and the
``transformers.Trainer`` adapter (:mod:`mllm_metrics.hf`) only *produce* one :class:`BatchResult`
per batch (from their forward, their loader and their gather) and *report* what
:class:`Evaluation` computes in their framework's way. A feature added here reaches both.

The model side of a batch (processed labels, the supervised-only head, generation) is
:mod:`mllm_metrics.forward`; this module never sees a model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from mllm_metrics.functional import (
    _bit_match_rows,
    _decoded_supervised_spans,
    _exact_match_rows,
)
from mllm_metrics.grouped import MACRO, GroupedMetric, _check_groups
from mllm_metrics.metrics import (
    BitMatchAccuracy,
    ExactMatchAccuracy,
    GeneratedBitMatch,
    GeneratedExactMatch,
    TextBitMatchAccuracy,
    TextExactMatch,
    TokenNLL,
    _unchanged_on_error,
    causal_lm_metrics,
)
from mllm_metrics.records import SampleRecords, row_statistics, write_records_file

__all__ = ["BatchResult", "Evaluation"]


@dataclass
class BatchResult:
    """What one evaluation batch contributes: the one value both shells hand to the core.

    Attributes:
        preds: argmax token ids, causally shifted, shape (B, L): position ``t`` is the
            prediction for ``target[:, t]``; :data:`~mllm_metrics.chunked.NOT_PREDICTED` where
            the supervised-only head left a position out.
        target: the processed labels shifted by one, (B, L); ``ignore_index`` where unsupervised.
        row_nll: each row's summed NLL over its supervised positions, (B,); None when not
            computed.
        samples: (B,) bool, the rows that are samples of the eval set (False for the repeats a
            padding ``DistributedSampler`` adds); None when every row is one.
        keys: each row's place in the eval set's order, a sortable value (the data-set index,
            or ``(index, row)`` for pre-collated items); None to number rows as they arrive.
        group: each row's group, an int64 tensor (B,) of positions in ``groups``; None without
            groups.
        generated: each row's greedy answer (token ids), None for a row that was not
            generated; None when the batch was not generated at all.
        references: each row's reference answer for ``generated`` (its last run of supervised
            labels in the data set's labels), None for a row without one.
    """

    preds: Tensor
    target: Tensor
    row_nll: Tensor | None = None
    samples: Tensor | None = None
    keys: Sequence[Any] | None = None
    group: Tensor | None = None
    generated: list[list[int] | None] | None = None
    references: list[list[int] | None] | None = None

    @property
    def rows(self) -> int:
        """The number of rows of the batch."""
        return self.target.shape[0]

    def kept_rows(self) -> list[int]:
        """The rows that are samples of the eval set, in order."""
        if self.samples is None:
            return list(range(self.rows))
        return [row for row, kept in enumerate(self.samples.tolist()) if kept]

    def only_samples(self) -> BatchResult:
        """The batch without the rows that are not samples of the eval set.

        They are removed, not masked: a user's metric may count a row without labels (as
        torchmetrics' ``MulticlassExactMatch`` counts it a match).
        """
        if self.samples is None:
            return self
        kept = self.kept_rows()
        index = torch.tensor(kept, dtype=torch.long)

        def rows_of(value: Any) -> Any:
            if value is None:
                return None
            if isinstance(value, Tensor):
                return value[index.to(value.device)]
            return [value[row] for row in kept]

        return BatchResult(
            preds=rows_of(self.preds),
            target=rows_of(self.target),
            row_nll=rows_of(self.row_nll),
            keys=rows_of(self.keys),
            group=rows_of(self.group),
            generated=rows_of(self.generated),
            references=rows_of(self.references),
        )


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is not None and not callable(getattr(tokenizer, "batch_decode", None)):
        raise TypeError(
            "Expected a tokenizer with a `batch_decode` method (a Hugging Face tokenizer), "
            f"got {type(tokenizer).__name__}."
        )


def _never_distributed() -> bool:
    return False


def _local_only(modules: nn.Module) -> nn.Module:
    """Make every metric in ``modules`` compute from its local states, never all-reduce.

    For values that were gathered before the update (``Trainer`` hands every process the rows of
    all processes): an all-reduce would count each of them once per process. In torchmetrics
    ``sync_on_compute`` is copied into a private flag at construction (and again after each
    ``forward``), so setting it is not enough; ``Metric.sync`` checks
    ``distributed_available_fn`` (a documented constructor argument) at every call, so that is
    the switch, and the flags follow it for ``forward``.
    """
    for module in modules.modules():
        if isinstance(module, Metric):
            module.sync_on_compute = False
            module.dist_sync_on_step = False
            module.distributed_available_fn = _never_distributed
    return modules


def _token_collection(
    metrics: Metric | MetricCollection | Mapping[str, Metric] | Sequence[Metric] | None,
    ignore_index: int,
) -> MetricCollection:
    """A copy of the user's token metrics as one collection (default: bit- and exact-match)."""
    if metrics is None:
        return causal_lm_metrics(ignore_index=ignore_index)
    if isinstance(metrics, MetricCollection):
        return metrics.clone()
    if isinstance(metrics, Metric):
        return MetricCollection([metrics.clone()])
    if isinstance(metrics, Mapping) and all(isinstance(m, Metric) for m in metrics.values()):
        return MetricCollection({name: metric.clone() for name, metric in metrics.items()})
    if (
        isinstance(metrics, Sequence)
        and not isinstance(metrics, str)
        and all(isinstance(m, Metric) for m in metrics)
    ):
        return MetricCollection([metric.clone() for metric in metrics])
    raise TypeError(
        "Expected `metrics` to be a torchmetrics Metric, a MetricCollection, a dict of "
        f"Metrics, a list of Metrics or None, got {type(metrics).__name__}."
    )


class Evaluation(nn.Module):
    """Every metric and record of one evaluation (one stage and dataloader), from sums.

    :meth:`update` takes one :class:`BatchResult` whole or not at all (a bad batch changes no
    state and no record); :meth:`compute` returns every value; :meth:`reset` starts over.

    Keys of :meth:`compute` (the shells prepend ``val/`` or ``eval_``): the token metrics' own
    keys (``bit_match``, ``exact_match`` by default); ``nll_key`` (the token-weighted mean
    NLL); with a tokenizer ``text_bit_match`` and ``text_exact_match`` (on the decoded
    supervised spans of the rows that have one); with groups ``bit_match/<group>``,
    ``exact_match/<group>`` and ``<nll_key>/<group>`` for every group that has data, and
    ``bit_match/macro``, ``exact_match/macro``, the means over those groups; with generation
    ``gen_bit_match``, ``gen_exact_match`` (and ``gen_text_*`` with a tokenizer).

    "No data, no number": a group without any supervised position is left out of the results
    and of the macro means. A metric with no data at all returns its ``zero_division`` (0.0 for
    the accuracies, NaN for the NLL: a loss of 0 would read as perfect).

    Args:
        metrics: the token metrics, fed ``(preds, target)``; copied. Default:
            :func:`~mllm_metrics.causal_lm_metrics`.
        ignore_index: label value of unsupervised positions.
        nll_key: the key of the NLL (``"loss"`` in Lightning, ``"nll"`` for ``Trainer``, whose
            ``eval_loss`` is its own); None to leave the NLL out.
        tokenizer: anything with ``batch_decode``: adds the text metrics and the decoded
            ``prediction``, ``reference`` and ``generated`` to the records.
        text_alphabet: the characters the text bit-match keeps; None keeps all.
        groups: the group names; None without groups.
        generation: whether batches may carry generated answers (adds the ``gen_*`` metrics).
        records: keep per-sample records, written by :meth:`write_records`.
        distributed: the values of each process are its own and :meth:`compute` sums them over
            the processes (Lightning); False when every process is handed the rows of all
            (``Trainer``'s gather).

    Examples:
        >>> import torch
        >>> evaluation = Evaluation(groups=["vqa", "ocr"], nll_key="nll")
        >>> evaluation.update(BatchResult(
        ...     preds=torch.tensor([[5, 6], [7, 7]]), target=torch.tensor([[5, 6], [7, 8]]),
        ...     row_nll=torch.tensor([0.5, 2.5], dtype=torch.float64),
        ...     group=torch.tensor([0, 0])))
        >>> {key: round(value.item(), 3) for key, value in evaluation.compute().items()}
        {'bit_match': 0.75, 'exact_match': 0.5, 'nll': 0.75, 'bit_match/vqa': 0.75, \
'bit_match/macro': 0.75, 'exact_match/vqa': 0.5, 'exact_match/macro': 0.5, 'nll/vqa': 0.75}

    """

    def __init__(
        self,
        metrics: Metric | MetricCollection | Mapping[str, Metric] | Sequence[Metric] | None = None,
        *,
        ignore_index: int = -100,
        nll_key: str | None = "loss",
        tokenizer: Any = None,
        text_alphabet: str | None = None,
        groups: Sequence[str] | None = None,
        generation: bool = False,
        records: bool = False,
        distributed: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(
                f"Expected `ignore_index` to be an int, got {type(ignore_index).__name__}."
            )
        _check_tokenizer(tokenizer)
        self.ignore_index = ignore_index
        self.nll_key = nll_key
        self.tokenizer = tokenizer
        self.groups = None if groups is None else _check_groups(groups)
        self.distributed = distributed
        self.tokens = _token_collection(metrics, ignore_index)
        self.nll = None if nll_key is None else TokenNLL(ignore_index=ignore_index)
        self.text = (
            None
            if tokenizer is None
            else MetricCollection(
                {
                    "text_bit_match": TextBitMatchAccuracy(alphabet=text_alphabet),
                    "text_exact_match": TextExactMatch(),
                }
            )
        )
        self.grouped = None if self.groups is None else self._grouped_metrics()
        self.generated = None
        if generation:
            generated: dict[str, Metric] = {
                "gen_bit_match": GeneratedBitMatch(),
                "gen_exact_match": GeneratedExactMatch(),
            }
            if tokenizer is not None:
                generated["gen_text_bit_match"] = TextBitMatchAccuracy(alphabet=text_alphabet)
                generated["gen_text_exact_match"] = TextExactMatch()
            self.generated = MetricCollection(generated)
        self.records = SampleRecords() if records else None
        #: The records of the last evaluation written, in order (process 0 only).
        self.last_records: list[dict[str, Any]] | None = None
        self._rows_seen = 0
        if not distributed:
            _local_only(self)

    def _grouped_metrics(self) -> nn.ModuleDict:
        assert self.groups is not None
        grouped = {
            "bit_match": GroupedMetric(BitMatchAccuracy(self.ignore_index), self.groups),
            "exact_match": GroupedMetric(ExactMatchAccuracy(self.ignore_index), self.groups),
        }
        if self.nll_key is not None:
            grouped[self.nll_key] = GroupedMetric(TokenNLL(self.ignore_index), self.groups)
        return nn.ModuleDict(grouped)

    @property
    def rows_seen(self) -> int:
        """The rows of every batch added since the last reset (also those not samples)."""
        return self._rows_seen

    # ---- the metrics, as objects (what Lightning logs) ------------------------------------------

    def state_metrics(self) -> list[Metric]:
        """Every metric that holds states (what :meth:`update` changes)."""
        metrics: list[Metric] = list(self.tokens.values(copy_state=False))
        if self.nll is not None:
            metrics.append(self.nll)
        for collection in (self.text, self.generated):
            if collection is not None:
                metrics += list(collection.values(copy_state=False))
        if self.grouped is not None:
            metrics += list(self.grouped.values())
        return metrics

    def scalar_metrics(self, generated: bool = True) -> dict[str, Metric]:
        """The metric objects of the scalar values, by key: the token metrics, the NLL, the text
        metrics and (with ``generated``) the free-running ones."""
        scalars: dict[str, Metric] = dict(self.tokens.items(keep_base=False, copy_state=False))
        if self.nll is not None:
            scalars[self.nll_key] = self.nll  # type: ignore[index]
        if self.text is not None:
            scalars |= dict(self.text.items(copy_state=False))
        if generated and self.generated is not None:
            scalars |= dict(self.generated.items(copy_state=False))
        return scalars

    # ---- per batch ------------------------------------------------------------------------------

    def update(self, result: BatchResult, *, keep_records: bool = True) -> None:
        """Add one batch; a batch that raises changes no state and no record.

        Args:
            result: the batch's value.
            keep_records: keep its records (False on the processes that do not write them).

        """
        self._check(result)
        kept = result.kept_rows()
        with self.whole_or_nothing():
            if kept:
                self._update_metrics(result.only_samples(), kept, keep_records)
            self._rows_seen += result.rows

    @contextmanager
    def whole_or_nothing(self) -> Iterator[None]:
        """Undo every update made in the block if it raises: states, records, row count."""
        recorded = 0 if self.records is None else len(self.records)
        seen = self._rows_seen
        try:
            with _unchanged_on_error(self.state_metrics()):
                yield
        except BaseException:
            if self.records is not None:
                self.records.truncate(recorded)
            self._rows_seen = seen
            raise

    def _check(self, result: BatchResult) -> None:
        rows = result.rows
        if result.preds.shape != result.target.shape:
            raise ValueError(
                f"Got predictions of shape {tuple(result.preds.shape)} for labels of shape "
                f"{tuple(result.target.shape)}: every label needs one prediction."
            )
        for name in ("row_nll", "samples", "group"):
            value = getattr(result, name)
            if value is not None and tuple(value.shape) != (rows,):
                raise ValueError(
                    f"Got `{name}` of shape {tuple(value.shape)} for a batch of {rows} rows: "
                    "one value per row is expected."
                )
        for name in ("keys", "generated", "references"):
            value = getattr(result, name)
            if value is not None and len(value) != rows:
                raise ValueError(
                    f"Got {len(value)} `{name}` for a batch of {rows} rows: one per row is "
                    "expected."
                )
        if (result.group is None) != (self.groups is None):
            raise ValueError(
                "The batch carries group ids but the evaluation has no groups: pass `groups=` "
                "(with `group_key=`) when building it, or leave the group ids out."
                if self.groups is None
                else f"The evaluation has groups {list(self.groups)} but the batch carries no "
                "group ids. Likely cause: fields built by hand without `group=`, or a model "
                "exposed without the object that has the groups."
            )
        if result.generated is not None and self.generated is None:
            raise ValueError(
                "The batch carries generated answers but the evaluation was built without "
                "generation (`generate_max_new_tokens`): they would count nowhere."
            )
        if (result.generated is None) != (result.references is None):
            given, missing = ("generated answers", "references")
            if result.generated is None:
                given, missing = missing, given
            raise ValueError(
                f"The batch carries {given} but no {missing}: a generated answer is scored "
                "against its reference, so both come together (None for a row without one)."
            )

    def _update_metrics(self, result: BatchResult, kept: list[int], keep_records: bool) -> None:
        """Update every metric with ``result``, the rows that are samples; ``kept`` are their
        rows in the batch as it arrived (what numbers them when the batch has no keys)."""
        preds, target, row_nll = result.preds, result.target, result.row_nll
        self.tokens.update(preds, target)
        if self.nll is not None:
            if row_nll is None:
                raise ValueError(
                    "The evaluation computes the NLL but the batch carries no `row_nll` (each "
                    "row's summed NLL). Pass it (`preprocessed_fields(ids, labels, row_nll)`), "
                    "or turn the NLL off (`StreamingMetrics(nll=False)`, `nll_key=None`)."
                )
            supervised = (target != self.ignore_index).sum()
            self.nll._update_sums(row_nll.sum(dtype=torch.float64), supervised)
        columns: dict[str, list[Any]] = {}  # record fields of the kept rows
        if self.grouped is not None:
            assert result.group is not None and self.groups is not None
            self._update_groups(preds, target, row_nll, result.group)
            columns["group"] = [self.groups[i] for i in result.group.tolist()]
        if self.text is not None:
            texts = _decoded_supervised_spans(self.tokenizer, preds, target, self.ignore_index)
            has_label = (target != self.ignore_index).any(dim=1).tolist()
            self.text.update(*([t for t, keep in zip(side, has_label) if keep] for side in texts))
            columns["prediction"], columns["reference"] = texts
        if self.generated is not None:
            columns |= self._update_generated(result)
        if self.records is not None and keep_records:
            self._add_records(result, kept, columns)

    def _update_groups(
        self, preds: Tensor, target: Tensor, row_nll: Tensor | None, group: Tensor
    ) -> None:
        assert self.grouped is not None
        group = group.to(target.device)
        correct, supervised = _bit_match_rows(preds, target, self.ignore_index)
        self.grouped["bit_match"]._update_rows(correct, supervised, group)
        exact, counted = _exact_match_rows(preds, target, self.ignore_index)
        self.grouped["exact_match"]._update_rows(exact, counted, group)
        if self.nll_key is not None:
            assert row_nll is not None
            self.grouped[self.nll_key]._update_rows(row_nll.to(target.device), supervised, group)

    def _update_generated(self, result: BatchResult) -> dict[str, list[Any]]:
        """Update the ``gen_*`` metrics with the rows that were generated and have a
        reference; their record fields (null elsewhere)."""
        assert self.generated is not None
        column: dict[str, list[Any]] = {"gen_exact": [None] * result.rows}
        if self.tokenizer is not None:
            column["generated"] = [None] * result.rows
        if result.generated is None or result.references is None:
            return column
        counted = [
            row
            for row, (answer, reference) in enumerate(zip(result.generated, result.references))
            if answer is not None and reference is not None
        ]
        answers = [result.generated[row] for row in counted]
        references = [result.references[row] for row in counted]
        self.generated["gen_bit_match"].update(answers, references)
        self.generated["gen_exact_match"].update(answers, references)
        for i, answer, reference in zip(counted, answers, references):
            column["gen_exact"][i] = answer == reference
        if self.tokenizer is not None:
            decoded = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
            expected = self.tokenizer.batch_decode(references, skip_special_tokens=True)
            self.generated["gen_text_bit_match"].update(decoded, expected)
            self.generated["gen_text_exact_match"].update(decoded, expected)
            for i, text in zip(counted, decoded):
                column["generated"][i] = text
        return column

    def _add_records(self, result: BatchResult, kept: list[int], columns: dict[str, Any]) -> None:
        assert self.records is not None
        keys = result.keys
        if keys is None or any(key is None for key in keys):
            # The order the rows arrive in, interleaved over the processes as a
            # DistributedSampler deals them (one process: the order of the batches).
            world, rank = (1, 0) if not self.distributed else _world_and_rank()
            keys = [((self._rows_seen + row) * world + rank, 0) for row in kept]
        statistics = row_statistics(result.preds, result.target, result.row_nll, self.ignore_index)
        self.records.add(list(keys), statistics | columns)

    # ---- the values ------------------------------------------------------------------------

    def compute(self, generated: bool = True) -> dict[str, Tensor]:
        """Every value, by key (see the class docstring); ``generated=False`` leaves out the
        free-running ones (an evaluation that did not generate)."""
        values: dict[str, Tensor] = {
            key: metric.compute() for key, metric in self.scalar_metrics(generated).items()
        }
        if self.grouped is not None:
            values |= self.compute_groups()
        return values

    def compute_groups(self) -> dict[str, Tensor]:
        """``<metric>/<group>`` for the groups with data, and ``bit_match/macro``,
        ``exact_match/macro`` (see :meth:`group_values`)."""
        return {
            f"{name}/{key}": grouped.compute()[key] for name, grouped, key in self.group_values()
        }

    def group_values(self) -> Iterator[tuple[str, GroupedMetric, str]]:
        """``(metric name, its grouped metric, key)`` of each per-group value: one per group
        with data, and the macro means (none for the NLL: a mean of losses over groups is not
        a loss). Computes each grouped metric (once: torchmetrics caches the value)."""
        for name, grouped in (self.grouped or {}).items():
            for key in grouped.compute():
                if key != MACRO or name != self.nll_key:
                    yield name, grouped, key

    def reset(self) -> None:
        """Zero every metric and forget the records: a new evaluation."""
        for metric in self.state_metrics():
            metric.reset()
        if self.records is not None:
            self.records.clear()
        self._rows_seen = 0

    def clear_records(self) -> None:
        """Forget the records kept since the last reset, unwritten (a sanity check)."""
        if self.records is not None:
            self.records.clear()

    def write_records(self, path: Path | None, gather: bool | None = None) -> Path | None:
        """Write the records kept since the last reset to ``path`` and forget them; they stay
        in :attr:`last_records` (on the process that wrote them) until the next write.

        With ``gather`` (default: ``distributed``) every process must call this: process 0
        gathers every process's records and writes them in order. A write that fails (a full
        disk) leaves no partial file and warns instead of raising, so the metrics survive it.
        ``path=None`` gathers without writing a file.

        Returns:
            the path written, on process 0; None elsewhere or on failure.

        """
        if self.records is None:
            return None
        records = self.records.gather(self.distributed if gather is None else gather)
        self.last_records = records
        if records is None or path is None:
            return None
        return write_records_file(path, records)


def _world_and_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
