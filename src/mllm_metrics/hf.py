"""Streaming metrics for the stock ``transformers.Trainer``: no subclass, no overridden method.

``Trainer`` already offers the two hooks this needs:

- ``preprocess_logits_for_metrics`` runs on every evaluation batch, on each process, *before*
  the predictions are gathered and kept. :meth:`StreamingMetrics.preprocess_logits` turns the
  logits into token ids there (causal shift + argmax, against the *processed* labels when the
  model returns them), so only ``B x L`` integers are ever gathered or kept, never ``B x L x V``
  logits. It also sums the negative log-likelihood of each row, from the logits it has anyway.
- ``compute_metrics`` receives those ids, already gathered from every process (duplicated
  samples dropped). With ``TrainingArguments(batch_eval_metrics=True)`` (transformers >= 4.44)
  it is called once per batch and updates the metrics' integer sums, so memory stays flat; on
  older releases it is called once at the end with the ids of the whole eval set.

:func:`expose_processed_labels` makes a LLaVA-style model's outputs carry the labels its
logits align with (``processed_labels``), tells ``Trainer`` which output fields to leave out of
the gathered predictions, and turns the ``remove_unused_columns`` trap into a clear error.

Usage::

    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    expose_processed_labels(model)
    streaming = StreamingMetrics()
    args = TrainingArguments(..., batch_eval_metrics=True)
    trainer = Trainer(model, args, ..., compute_metrics=streaming,
                      preprocess_logits_for_metrics=streaming.preprocess_logits)
    trainer.evaluate()  # eval_bit_match, eval_exact_match, eval_nll, eval_loss, ...

Why ``eval_nll`` next to ``eval_loss``: ``Trainer``'s ``eval_loss`` is the mean over batches of
the model's per-batch loss. Since transformers 4.46 that loss is divided by
``num_items_in_batch``, which ``Trainer`` counts from the data set's labels; a LLaVA-style
``forward`` that truncates rows drops supervised labels, so the division uses too many tokens and
``eval_loss`` comes out too low. And a mean of per-batch means weights batches, not tokens.
``eval_nll`` is the summed token negative log-likelihood over the processed labels divided by
their number of supervised tokens, over the whole eval set: the token-weighted loss. ``eval_loss``
is left as ``Trainer`` computes it (the model's loss also drives training, so it is not touched).

This module does not import ``transformers``: it works with whatever ``Trainer`` calls it.
"""

from __future__ import annotations

import copy
import functools
import sys
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from mllm_metrics._warning import MllmMetricsWarning
from mllm_metrics.chunked import NOT_PREDICTED, _check_chunk_size, supervised_head_predictions
from mllm_metrics.functional import (
    _check_label_values,
    _check_labels_dtype,
    _decoded_supervised_spans,
    _is_signed_integer,
    _row_nll,
    causal_shift,
)
from mllm_metrics.labels import (
    PREPARE_METHOD,
    PROCESSED_LABELS_FIELD,
    ProcessedLabelsHandle,
    _is_processed_labels,
    aligned_hidden_states,
)
from mllm_metrics.labels import expose_processed_labels as _expose_labels
from mllm_metrics.metrics import (
    TextBitMatchAccuracy,
    TextExactMatch,
    TokenNLL,
    _unchanged_on_error,
    causal_lm_metrics,
)
from mllm_metrics.records import SampleRecords, records_file_name, row_statistics

__all__ = [
    "IGNORED_OUTPUT_KEYS",
    "ChunkedEvalOutput",
    "StreamingMetrics",
    "expose_processed_labels",
]

#: The value ``Trainer`` pads predictions and labels with, across processes and batches.
TRAINER_PAD_INDEX = -100

#: Output fields :func:`expose_processed_labels` adds to ``config.keys_to_ignore_at_inference``:
#: caches, hidden states, attentions and vision/audio encoder outputs. ``Trainer`` would pad,
#: gather and keep each of them per batch, and some (caches, nested encoder outputs holding
#: ``None``) make its padding fail. Only ``logits`` and ``processed_labels`` are needed.
IGNORED_OUTPUT_KEYS: tuple[str, ...] = (
    "cache",
    "past_key_values",
    "hidden_states",
    "attentions",
    "cross_attentions",
    "image_outputs",
    "video_outputs",
    "audio_outputs",
    "image_hidden_states",
    "video_hidden_states",
    "rope_deltas",
)

_IGNORE_KEYS_ATTRIBUTE = "keys_to_ignore_at_inference"

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _never_distributed() -> bool:
    return False


def _local_only(collection: MetricCollection) -> MetricCollection:
    """Make every metric of ``collection`` (nested ones included) compute from its local states.

    In torchmetrics 1.9 ``sync_on_compute`` is copied into a private flag at construction, so
    assigning it later changes nothing. The attribute that ``Metric.sync`` reads at every call is
    ``distributed_available_fn`` (a documented constructor argument): a function that says "not
    distributed" turns off the all-reduce of ``compute()``, of ``forward`` with
    ``dist_sync_on_step`` and of a manual ``sync()``. ``sync_on_compute`` is set too, so that it
    reads true.
    """
    for module in collection.modules():
        if isinstance(module, Metric):
            module.sync_on_compute = False
            module.dist_sync_on_step = False
            module.distributed_available_fn = _never_distributed
    return collection


class _RowNLL(TokenNLL):
    """:class:`~mllm_metrics.TokenNLL` fed with each row's summed NLL: logits never reach
    ``compute_metrics``, so :meth:`StreamingMetrics.preprocess_logits` reduces them to row sums,
    one per sample, which ``Trainer`` gathers and de-duplicates like the ids."""

    def update(self, row_nll: Tensor, target: Tensor) -> None:
        """Add the rows' summed NLL and their supervised tokens."""
        self._add(row_nll.sum(dtype=torch.float64), (target != self.ignore_index).sum())


def _as_collection(
    metrics: Metric | MetricCollection | Mapping[str, Metric] | Sequence[Metric] | None,
    ignore_index: int,
) -> MetricCollection:
    if metrics is None:
        return causal_lm_metrics(ignore_index=ignore_index, sync_on_compute=False)
    if isinstance(metrics, MetricCollection):
        collection = metrics.clone()
    elif isinstance(metrics, Metric):
        collection = MetricCollection([metrics.clone()])
    elif isinstance(metrics, Mapping) and all(isinstance(m, Metric) for m in metrics.values()):
        collection = MetricCollection({name: m.clone() for name, m in metrics.items()})
    elif (
        isinstance(metrics, Sequence)
        and not isinstance(metrics, str)
        and all(isinstance(m, Metric) for m in metrics)
    ):
        collection = MetricCollection([m.clone() for m in metrics])
    else:
        raise TypeError(
            "Expected `metrics` to be a torchmetrics Metric, a MetricCollection, a dict of "
            f"Metrics, a list of Metrics or None, got {type(metrics).__name__}."
        )
    return _local_only(collection)


# --------------------------------------------------------------------------------------------
# What Trainer hands to preprocess_logits_for_metrics and compute_metrics
# --------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, (Tensor, np.ndarray)):
        return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value[:6])
        return f"{type(value).__name__}({inner}{', ...' if len(value) > 6 else ''})"
    return type(value).__name__


def _is_int_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and _is_signed_integer(value)


def _split_model_outputs(outputs: Any) -> tuple[Tensor, Tensor | None]:
    """Find the logits and, when present, the processed labels in what ``Trainer`` passes on.

    ``Trainer`` turns the model's output into a tuple of its fields (less ``loss`` and the keys
    to ignore) and detaches them, so the field names are lost: the processed labels are
    recognised by identity (the very tensor the exposed model's forward returned, see
    :func:`expose_processed_labels`), never by their dtype or shape, since a model may return
    other integer fields of the same shape. A single remaining field arrives as a bare tensor.
    """
    if isinstance(outputs, Mapping):
        logits, labels = outputs.get("logits"), outputs.get(PROCESSED_LABELS_FIELD)
    elif isinstance(outputs, (tuple, list)):
        logits = next((v for v in outputs if isinstance(v, Tensor) and v.is_floating_point()), None)
        labels = next((v for v in outputs if _is_processed_labels(v)), None)
    else:
        logits, labels = outputs, None
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 3:
        raise ValueError(
            "`StreamingMetrics.preprocess_logits` expected the model's logits, a floating-point "
            f"tensor of shape (batch, seq_len, vocab_size), got {_describe(outputs)}. It must be "
            "passed to Trainer as `preprocess_logits_for_metrics=`, and the model must return its "
            "logits first (a ModelOutput with `logits`, or a tuple starting with them)."
        )
    return logits, labels


def _chunked_outputs(outputs: Any) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(ids, processed_labels, row_nll)`` when ``outputs`` come from a chunked evaluation
    forward (:func:`expose_processed_labels` with ``logits_chunk_size``), else None."""
    if isinstance(outputs, Mapping):
        outputs = [outputs.get(key) for key in ChunkedEvalOutput.FIELDS]
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
        return None
    ids, processed, row_nll = outputs
    if (
        _is_int_tensor(ids)
        and ids.ndim == 2
        and _is_processed_labels(processed)
        and isinstance(row_nll, Tensor)
        and row_nll.is_floating_point()
        and row_nll.ndim == 1
    ):
        return ids, processed, row_nll
    return None


def _to_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.as_tensor(value)


def _per_batch(predictions: Any) -> list[Any]:
    """The batches in ``predictions``: one ``(preds, target[, row_nll])``, or a list of them.

    ``eval_do_concat_batches=False`` (transformers >= 4.42) gives a list of per-batch tuples;
    lists may stand for tuples at either level.
    """
    if (
        isinstance(predictions, (tuple, list))
        and predictions
        and all(isinstance(batch, (tuple, list)) for batch in predictions)
    ):
        return list(predictions)
    return [predictions]


class _Evaluation:
    """Which evaluation a ``compute_metrics`` call belongs to, by an object unique to it.

    ``Trainer`` gives ``compute_metrics`` no sign of where an evaluation starts, so an
    ``evaluate()`` that raised half-way would leave its sums to the next one. What identifies
    one run of ``Trainer.evaluation_loop`` (which ``evaluate()`` and ``predict()`` call) is an
    object it creates for itself: its ``all_preds`` container (transformers >= 4.42), else the
    accelerate ``DataLoaderShard`` it iterates (the ``active_dataloader`` of accelerate's
    ``GradientState``). Held by weak reference: nothing of it is kept alive. Outside ``Trainer``
    there is no marker, and the sums run until ``compute_result=True`` or ``reset()``.
    """

    def __init__(
        self, marker: object | None, prefix: str | None = None, step: int | None = None
    ) -> None:
        self._marker = None if marker is None else weakref.ref(marker)
        #: The loop's ``metric_key_prefix`` and the trainer's global step, when known.
        self.prefix = prefix
        self.step = step

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Evaluation):
            return NotImplemented
        if self._marker is None or other._marker is None:
            return self._marker is None and other._marker is None
        mine = self._marker()
        return mine is not None and mine is other._marker()

    __hash__ = None  # type: ignore[assignment]


_EVALUATION_LOOPS = ("evaluation_loop", "prediction_loop")


def _weakly_referable(value: object) -> bool:
    try:
        weakref.ref(value)
    except TypeError:
        return False
    return True


def _current_evaluation() -> _Evaluation:
    frame = sys._getframe(1)
    prefix = step = None
    while frame is not None:
        if frame.f_code.co_name in _EVALUATION_LOOPS and "self" in frame.f_locals:
            prefix = frame.f_locals.get("metric_key_prefix")
            step = getattr(getattr(frame.f_locals["self"], "state", None), "global_step", None)
            prefix = prefix if isinstance(prefix, str) else None
            step = step if isinstance(step, int) else None
            container = frame.f_locals.get("all_preds")
            if container is not None and _weakly_referable(container):
                return _Evaluation(container, prefix, step)
            break
        frame = frame.f_back
    state = sys.modules.get("accelerate.state")  # imported by Trainer; never imported here
    gradient_state = getattr(state, "GradientState", None)
    if gradient_state is None or not getattr(gradient_state, "_shared_state", None):
        return _Evaluation(None, prefix, step)
    try:
        loader = gradient_state().active_dataloader
    except (AttributeError, IndexError):
        loader = None
    return _Evaluation(loader if _weakly_referable(loader) else None, prefix, step)


class StreamingMetrics:
    """Token metrics for ``transformers.Trainer`` from integer sums, never from kept logits.

    Pass the object as ``compute_metrics=`` and its :meth:`preprocess_logits` as
    ``preprocess_logits_for_metrics=``. Each evaluation batch, on each process,
    :meth:`preprocess_logits` turns the logits into ``(preds, target, row_nll)``: the argmax ids
    of ``logits[:, :-1]``, the aligned labels shifted by one (the model's ``processed_labels``
    output when it has one, see :func:`expose_processed_labels`, else the batch's labels) and
    each row's summed negative log-likelihood. ``Trainer`` gathers those (B x L integers and B
    floats) and calls the object:

    - with ``TrainingArguments(batch_eval_metrics=True)`` (transformers >= 4.44) once per batch:
      the metrics' integer sums are updated, and on the last batch (``compute_result=True``) the
      results are returned and the sums reset. Memory stays flat over any eval set.
    - without it, once at the end with the ids of the whole eval set, concatenated by
      ``Trainer`` (rows padded with -100, which count as ignored).

    ``evaluate()`` then returns ``eval_<name>`` for each metric (``eval_bit_match`` and
    ``eval_exact_match`` by default) and ``eval_nll``, the mean NLL per supervised token over the
    processed labels (see the module docstring for why ``eval_loss`` is not that).

    ``Trainer`` has already gathered every process's ids when it calls the object, so the
    metrics must not all-reduce again (every count would be doubled on 2 processes): the metrics
    used here compute from their local states only. User metrics are copied for this (their
    ``distributed_available_fn`` is set to "not distributed", the switch torchmetrics reads at
    every sync); the objects passed in are left unchanged, and the copies are in
    :attr:`metrics`.

    Args:
        metrics: metrics updated with ``(preds, target)``: token ids of shape (N, L) and labels
            of shape (N, L) with ``ignore_index`` on unsupervised positions. A ``Metric``, a
            ``MetricCollection``, a dict or a list of Metrics; None gives
            :func:`mllm_metrics.causal_lm_metrics` (keys ``bit_match``, ``exact_match``).
        ignore_index: label of unsupervised positions; -100, the value ``Trainer`` pads with,
            is always treated as ignored as well.
        nll: also compute ``nll``, the token-weighted negative log-likelihood (one extra
            log-softmax over the logits per batch).
        records_dir: write one JSON Lines file of per-sample records there at the end of each
            evaluation (see :mod:`mllm_metrics.records`), from process 0 only, one line per
            gathered sample in ``Trainer``'s order (the data set's order, each sample once).
            Named ``{metric_key_prefix}_step{global_step:07d}.jsonl`` when the call comes from
            ``Trainer``'s evaluation loop (``eval_step0000040.jsonl``); otherwise the step is
            unknown and a counter of this object's evaluations is used
            (``eval_call0000001.jsonl``). Without ``batch_eval_metrics`` the file is written
            the same way, from the one call with the whole eval set.
        tokenizer: a Hugging Face tokenizer (anything with ``batch_decode``): adds
            ``text_bit_match`` and ``text_exact_match`` on the decoded supervised spans (rows
            without a supervised label are skipped), and ``prediction`` and ``reference`` to
            the records.
        text_alphabet: characters the text bit-match keeps (e.g. ``"01"``); None keeps all.

    Example:
        >>> import torch
        >>> streaming = StreamingMetrics()
        >>> logits = torch.zeros(2, 4, 8)  # (batch, seq_len, vocab): what the model returns
        >>> logits[0, :, 5] = 1.0  # row 0 always predicts token 5, row 1 token 0
        >>> labels = torch.tensor([[-100, 5, 5, 5], [-100, -100, 3, 0]])
        >>> preds, target, row_nll = streaming.preprocess_logits(logits, labels)
        >>> preds.tolist(), target.tolist()  # ids only: what Trainer gathers and keeps
        ([[5, 5, 5], [0, 0, 0]], [[5, 5, 5], [-100, 3, 0]])
        >>> results = streaming((preds, target, row_nll), compute_result=True)
        >>> {name: round(value, 4) for name, value in results.items()}
        {'bit_match': 0.8, 'exact_match': 0.5, 'nll': 1.5962}

    """

    def __init__(
        self,
        metrics: Metric | MetricCollection | Mapping[str, Metric] | Sequence[Metric] | None = None,
        ignore_index: int = -100,
        *,
        nll: bool = True,
        records_dir: str | Path | None = None,
        tokenizer: Any = None,
        text_alphabet: str | None = None,
    ) -> None:
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(
                f"Expected `ignore_index` to be an int, got {type(ignore_index).__name__}."
            )
        if tokenizer is not None and not callable(getattr(tokenizer, "batch_decode", None)):
            raise TypeError(
                f"Expected a tokenizer with a `batch_decode` method (a Hugging Face tokenizer), "
                f"got {type(tokenizer).__name__}."
            )
        self.ignore_index = ignore_index
        self.metrics: MetricCollection = _as_collection(metrics, ignore_index)
        self.tokenizer = tokenizer
        self._text = (
            _local_only(
                MetricCollection(
                    {
                        "text_bit_match": TextBitMatchAccuracy(alphabet=text_alphabet),
                        "text_exact_match": TextExactMatch(),
                    }
                )
            )
            if tokenizer is not None
            else None
        )
        self.records_dir = None if records_dir is None else Path(records_dir)
        self._records = SampleRecords()
        self._evaluations_written = 0
        self._nll = (
            _RowNLL(
                ignore_index=ignore_index,
                sync_on_compute=False,
                distributed_available_fn=_never_distributed,
            )
            if nll
            else None
        )
        self._device: torch.device | None = None
        self._evaluation: _Evaluation | None = None

    # ---- per batch, before the gather ------------------------------------------------------

    def preprocess_logits(self, logits: Any, labels: Tensor | None) -> tuple[Tensor, ...]:
        """Turn one batch's model outputs into token ids (and per-row NLL) before the gather.

        Args:
            logits: what ``Trainer`` passes on from the model's output: the logits alone, or a
                tuple of the output fields that are not ignored (logits first, then
                ``processed_labels`` when :func:`expose_processed_labels` is active).
            labels: the batch's labels as the data set gave them (used when the model returned
                no ``processed_labels``: models whose labels already line up with the logits).

        Returns:
            ``(preds, target, row_nll)``: int64 ids of shape (B, L'-1), the aligned labels
            shifted by one, (B, L'-1), and each row's summed NLL, (B,) float32; without
            ``row_nll`` when ``nll=False``. All on the logits' device.

        Raises:
            ValueError: if no logits are found, if the labels do not line up with the logits
                (a model that rewrites its labels without exposing them), or if a label is
                negative but not ignored (e.g. a -200 image placeholder left in the labels).

        """
        chunked = _chunked_outputs(logits)
        if chunked is not None:
            return self._preprocess_chunked(*chunked)
        logits, processed = _split_model_outputs(logits)
        aligned = processed if processed is not None else labels
        if not isinstance(aligned, Tensor):
            raise ValueError(
                "`StreamingMetrics.preprocess_logits` needs labels to score the logits of shape "
                f"{tuple(logits.shape)}, got {_describe(labels)}. Likely cause: the eval data "
                "set has no `labels` column (or TrainingArguments(label_names=...) names other "
                "columns)."
            )
        _check_labels_dtype(aligned, "labels")
        if aligned.shape != logits.shape[:2]:
            raise ValueError(
                f"The model returned logits of shape {tuple(logits.shape)} but the labels have "
                f"shape {tuple(aligned.shape)}, and no `{PROCESSED_LABELS_FIELD}` output reached "
                "`preprocess_logits`: the model rewrites its labels inside `forward`. Call "
                "`mllm_metrics.hf.expose_processed_labels(model)` before `trainer.evaluate()` "
                f"(it records them from `{PREPARE_METHOD}`), or make the model return "
                f"`{PROCESSED_LABELS_FIELD}` of shape {tuple(logits.shape[:2])} itself."
            )
        aligned = aligned.long()  # what Trainer pads, gathers and concatenates: one dtype
        if self.ignore_index != TRAINER_PAD_INDEX:
            aligned = aligned.masked_fill(aligned == TRAINER_PAD_INDEX, self.ignore_index)
        preds, target = causal_shift(logits, aligned)
        if self._nll is None:
            return preds, target
        _check_label_values(target, self.ignore_index, logits.shape[-1])
        return preds, target, _row_nll(logits[:, :-1], target, self.ignore_index)

    def _preprocess_chunked(
        self, ids: Tensor, processed: Tensor, row_nll: Tensor
    ) -> tuple[Tensor, ...]:
        """The same as for logits, from what a chunked evaluation forward returned."""
        target = processed.long()[:, 1:]
        if self.ignore_index != TRAINER_PAD_INDEX:
            target = target.masked_fill(target == TRAINER_PAD_INDEX, self.ignore_index)
        preds = ids[:, :-1]
        return (preds, target) if self._nll is None else (preds, target, row_nll.float())

    # ---- compute_metrics ----------------------------------------------------------------------

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, Any]:
        """Update the metrics with gathered ids; return the results when ``compute_result``.

        Args:
            eval_pred: ``Trainer``'s ``EvalPrediction`` (or its predictions alone), whose
                predictions are what
                :meth:`preprocess_logits` returned, gathered over processes (and, without
                ``batch_eval_metrics``, concatenated over batches).
            compute_result: ``Trainer`` passes False on all but the last batch when
                ``batch_eval_metrics=True``; called without it (once, at the end), it is True.

        Returns:
            ``{name: value}`` when ``compute_result`` (the sums are then reset), else ``{}``.

        Raises:
            ValueError: if the predictions are not ``preprocess_logits``' token ids.

        """
        predictions = getattr(eval_pred, "predictions", eval_pred)
        evaluation = _current_evaluation()
        if evaluation != self._evaluation:
            # A new evaluate()/predict(): whatever an interrupted one left behind is dropped.
            self.reset()
        # Also for the same evaluation: its prefix and step may be known only now (a one-call
        # evaluation, after its loader is done, has no marker, like the previous one).
        self._evaluation = evaluation
        batches = [self._parse(batch) for batch in _per_batch(predictions)]  # all checked first
        recorded = len(self._records)
        try:
            with _unchanged_on_error(self._all_metrics()):
                for batch in batches:
                    self.update(*batch)
        except BaseException:
            self._records.truncate(recorded)
            raise
        if not compute_result:
            return {}
        results = self.compute()
        self._write_records()
        self.reset()
        return results

    def _parse(self, predictions: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        expected = 3 if self._nll is not None else 2
        values = (
            [_to_tensor(v) for v in predictions]
            if isinstance(predictions, (tuple, list)) and len(predictions) == expected
            else None
        )
        if (
            values is None
            or not all(_is_int_tensor(v) and v.ndim == 2 for v in values[:2])
            or values[0].shape != values[1].shape
            or (
                expected == 3
                and (
                    not values[2].is_floating_point()
                    or values[2].ndim != 1
                    or len(values[2]) != len(values[0])
                )
            )
        ):
            raise ValueError(
                "`StreamingMetrics` expected the gathered output of its `preprocess_logits`: "
                f"{'(preds, target, row_nll)' if expected == 3 else '(preds, target)'} with "
                f"(N, L) integer ids, got {_describe(predictions)}. Likely cause: Trainer was "
                "not given `preprocess_logits_for_metrics=streaming.preprocess_logits` (it then "
                "keeps every batch's logits), or it was given another object's method."
            )
        return values[0], values[1], values[2] if expected == 3 else None

    def _all_metrics(self) -> list[Metric]:
        metrics = list(self.metrics.values(copy_state=False))
        if self._text is not None:
            metrics += list(self._text.values(copy_state=False))
        return metrics + ([self._nll] if self._nll is not None else [])

    def _records_kept_here(self) -> bool:
        """Whether this process keeps and writes the records: ``Trainer`` hands every process
        the same gathered rows, so process 0 alone does."""
        if self.records_dir is None:
            return False
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return not distributed or torch.distributed.get_rank() == 0

    def _write_records(self) -> None:
        if not self._records_kept_here():
            return
        evaluation = self._evaluation
        prefix = (evaluation.prefix if evaluation is not None else None) or "eval"
        step = evaluation.step if evaluation is not None else None
        self._evaluations_written += 1
        if step is None:
            name = records_file_name(prefix, self._evaluations_written, counter=True)
        else:
            name = records_file_name(prefix, step)
        self._records.write(self.records_dir / name, gather=False)

    def update(self, preds: Tensor, target: Tensor, row_nll: Tensor | None = None) -> None:
        """Add gathered token ids (and rows' NLL) to the sums; a bad batch changes nothing.

        Args:
            preds: token ids (N, L); negative values (``Trainer``'s padding) are set to 0, their
                labels are ignored anyway.
            target: labels (N, L); -100 always counts as ignored.
            row_nll: summed NLL per row (N,), or None.

        """
        if self._device != preds.device:  # batch_eval_metrics gives tensors on args.device
            self.metrics.to(preds.device)
            if self._nll is not None:
                self._nll.to(preds.device)
            self._device = preds.device
        if self.ignore_index != TRAINER_PAD_INDEX:
            target = target.masked_fill(target == TRAINER_PAD_INDEX, self.ignore_index)
        preds = preds.clamp(min=0)
        with _unchanged_on_error(self._all_metrics()):
            self.metrics.update(preds, target)
            if self._nll is not None and row_nll is not None:
                self._nll.update(row_nll, target)
            texts = None
            if self.tokenizer is not None:
                texts = _decoded_supervised_spans(self.tokenizer, preds, target, self.ignore_index)
                has_label = (target != self.ignore_index).any(dim=1).tolist()
                self._text.update(
                    *([t for t, keep in zip(side, has_label) if keep] for side in texts)
                )
            if self._records_kept_here():
                self._add_records(preds, target, row_nll, texts)

    def _add_records(
        self,
        preds: Tensor,
        target: Tensor,
        row_nll: Tensor | None,
        texts: tuple[list[str], list[str]] | None,
    ) -> None:
        """Keep each gathered row's record; ``Trainer`` gathers them in the data set's order."""
        rows = target.shape[0]
        columns = row_statistics(preds, target, row_nll, self.ignore_index)
        if texts is not None:
            columns["prediction"], columns["reference"] = texts
        start = len(self._records)
        self._records.add([(start + row,) for row in range(rows)], columns)

    def compute(self) -> dict[str, Any]:
        """The metrics' values over everything seen since the last reset (floats for scalars)."""
        values = dict(self.metrics.compute())
        if self._nll is not None:
            values["nll"] = self._nll.compute()
        if self._text is not None:
            values |= self._text.compute()
        return {
            name: value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
            for name, value in values.items()
        }

    def reset(self) -> None:
        """Zero the sums and forget the records (done after each ``compute_result=True``
        call, once the records are written)."""
        self.metrics.reset()
        if self._nll is not None:
            self._nll.reset()
        if self._text is not None:
            self._text.reset()
        self._records.clear()


# --------------------------------------------------------------------------------------------
# The model side
# --------------------------------------------------------------------------------------------


class _IgnoredOutputKeys:
    """Adds :data:`IGNORED_OUTPUT_KEYS` to ``config.keys_to_ignore_at_inference``; undoable."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.had_own = _IGNORE_KEYS_ATTRIBUTE in vars(config)
        self.previous = vars(config).get(_IGNORE_KEYS_ATTRIBUTE)
        current = list(getattr(config, _IGNORE_KEYS_ATTRIBUTE, None) or [])
        self.value = current + [key for key in IGNORED_OUTPUT_KEYS if key not in current]
        setattr(config, _IGNORE_KEYS_ATTRIBUTE, self.value)

    def restore(self, copies: Sequence[nn.Module] = ()) -> None:
        """Restore the config, and the configs of the model's ``copies`` (deep copies made
        while the exposure was active, whose configs hold a copy of the changed list)."""
        configs = [self.config] + [
            config
            for config in (getattr(module, "config", None) for module in copies)
            if config is not None and config is not self.config
        ]
        for config in configs:
            current = vars(config).get(_IGNORE_KEYS_ATTRIBUTE)
            if current is not self.value and (config is self.config or current != self.value):
                warnings.warn(
                    f"`config.{_IGNORE_KEYS_ATTRIBUTE}` was changed after mllm_metrics set it, "
                    "so it is left as it is now.",
                    category=MllmMetricsWarning,
                    stacklevel=3,
                )
            elif self.had_own:
                previous = self.previous
                if config is not self.config and isinstance(previous, list):
                    previous = list(previous)
                setattr(config, _IGNORE_KEYS_ATTRIBUTE, previous)
            else:
                delattr(config, _IGNORE_KEYS_ATTRIBUTE)


# The likely cause named by the placeholder error under Trainer (see expose_processed_labels).
_TRAINER_PLACEHOLDER_CAUSE = (
    "Likely cause: Trainer's `remove_unused_columns=True` (the default) dropped the data set "
    "column holding the images because its name is not an argument of `forward` (e.g. a column "
    "`image` for the argument `images`). Rename the column to the argument's name, or set "
    "`TrainingArguments(remove_unused_columns=False)` and let the data collator build the "
    "argument."
)


class ChunkedEvalOutput(dict):
    """What an evaluation forward returns under ``expose_processed_labels(logits_chunk_size=N)``.

    A dict (``Trainer`` turns its values, less ``loss``, into the tuple it hands to
    ``preprocess_logits_for_metrics``), with attribute access like a ``ModelOutput``:

    - ``loss``: the loss the model would have returned: the mean NLL of the supervised shifted
      labels (or their sum over ``num_items_in_batch`` when that argument is passed);
    - ``predictions``: argmax ids (batch, seq_len), position ``t`` predicting label ``t + 1``;
      :data:`~mllm_metrics.chunked.NOT_PREDICTED` where that label is not supervised;
    - ``processed_labels``: the labels the predictions align with (batch, seq_len);
    - ``row_nll``: each row's summed NLL (batch,), float64.
    """

    FIELDS = ("predictions", PROCESSED_LABELS_FIELD, "row_nll")

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _ChunkedEvalForward:
    """Set as ``model.forward`` while exposed with a chunk size: an evaluation forward with
    labels (``model.training`` False) runs the model up to its hidden states and the output head
    on the supervised positions only, and returns a :class:`ChunkedEvalOutput` instead of
    logits. Every other call (training, no labels, a model that cannot be split) is the model's
    own forward. ``functools.update_wrapper`` keeps the signature ``Trainer`` inspects."""

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        self.model_ref = weakref.ref(model)
        self.chunk_size = chunk_size
        self.active = True
        self.warned = False
        self.had_own_forward = "forward" in vars(model)
        self.own_forward = vars(model).get("forward")
        functools.update_wrapper(self, model.forward)

    def _original(self, model: nn.Module) -> Any:
        return self.own_forward if self.had_own_forward else type(model).forward.__get__(model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model_ref()
        if model is None:
            raise ReferenceError("the model this forward belonged to no longer exists")
        forward = self._original(model)
        if not self.active or model.training or args or kwargs.get("labels") is None:
            return forward(*args, **kwargs)
        split = aligned_hidden_states(model, kwargs)
        if split is None or split.labels is None:
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"`logits_chunk_size` is set but {type(model).__name__} cannot be run up to "
                    "its hidden states and output head separately; evaluating with its full "
                    "forward, which holds the whole (batch, seq_len, vocab) logits.",
                    category=MllmMetricsWarning,
                    stacklevel=2,
                )
            return forward(*args, **kwargs)
        chunked = supervised_head_predictions(
            split.hidden_states, split.output_head, split.labels, self.chunk_size
        )
        items = kwargs.get("num_items_in_batch")
        denominator = (chunked.target != TRAINER_PAD_INDEX).sum() if items is None else items
        not_predicted = chunked.preds.new_full((chunked.preds.shape[0], 1), NOT_PREDICTED)
        return ChunkedEvalOutput(
            loss=(chunked.row_nll.sum() / denominator).float(),
            predictions=torch.cat([chunked.preds, not_predicted], dim=1),
            processed_labels=split.labels,
            row_nll=chunked.row_nll,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> _ChunkedEvalForward:
        copied = memo.get(id(self.model_ref()))
        clone = object.__new__(_ChunkedEvalForward)
        clone.__dict__.update(self.__dict__)
        if isinstance(copied, nn.Module):
            clone.model_ref = weakref.ref(copied)
            # A forward the instance had of its own is bound to the original: bind it to the copy.
            clone.own_forward = copy.deepcopy(self.own_forward, memo)
        return clone

    def __reduce__(self) -> Any:
        raise TypeError(
            "A model exposed with `logits_chunk_size` cannot be pickled while exposed: call the "
            "handle's `remove()` first (or expose it without a chunk size)."
        )

    def remove(self) -> None:
        model = self.model_ref()
        self.active = False
        if model is None:
            return
        if vars(model).get("forward") is not self:
            warnings.warn(
                f"`{type(model).__name__}.forward` was replaced after mllm_metrics wrapped it "
                "(e.g. by accelerate's mixed precision), so the wrapper stays in place; it now "
                "calls the model's own forward.",
                category=MllmMetricsWarning,
                stacklevel=4,
            )
        elif self.had_own_forward:
            model.forward = self.own_forward
        else:
            del model.forward


def expose_processed_labels(
    model: nn.Module, *, logits_chunk_size: int | None = None
) -> ProcessedLabelsHandle:
    """Prepare a model for :class:`StreamingMetrics` under ``transformers.Trainer``.

    Three things, all undone by the returned handle's ``remove()``:

    1. A LLaVA-style model (one with ``prepare_inputs_labels_for_multimodal``) gets a
       ``processed_labels`` field in every output: the labels its logits align with
       (:func:`mllm_metrics.labels.expose_processed_labels`: forward hooks, so ``forward``, its
       signature and the class are untouched, and accelerate may still wrap ``forward`` for
       mixed precision). Models whose labels already line up with the logits are unchanged.
    2. ``model.config.keys_to_ignore_at_inference`` (the list ``Trainer.prediction_step`` drops
       from the outputs when ``evaluate()`` gets no ``ignore_keys``) is extended with
       :data:`IGNORED_OUTPUT_KEYS`. Hugging Face's ``LlavaForConditionalGeneration`` in
       transformers 5 returns ``cache`` and ``image_outputs`` fields that ``Trainer`` cannot
       pad; they would also be gathered for nothing. The attribute is set on the config
       instance, so a checkpoint saved meanwhile records it in ``config.json`` (harmless:
       ``Trainer`` is its only reader).
    3. A LLaVA-style model raises a clear error, naming ``remove_unused_columns``, when
       ``input_ids`` hold negative placeholder ids and no image/video tensor reached
       ``forward`` (instead of an ``IndexError`` deep in the embedding).

    Call it before ``trainer.evaluate()`` or ``trainer.train()``, on the model given to
    ``Trainer``.

    With ``logits_chunk_size=N``, evaluation and prediction forwards (``model.training`` is
    False, ``labels`` given) never build the logits: the model runs up to its final hidden
    states and the output head is applied to the supervised positions only, N at a time
    (:mod:`mllm_metrics.chunked`); the forward returns a :class:`ChunkedEvalOutput` (argmax
    ids, processed labels, each row's NLL and the loss the model would have returned, so
    ``eval_loss`` is unchanged) that :meth:`StreamingMetrics.preprocess_logits` accepts like
    logits. Training forwards, forwards without labels and models that cannot be split (a
    warning says so) run the model's own forward. This replaces ``forward`` on the instance
    (keeping its signature, which ``Trainer`` inspects) until ``remove()``; a deep copy gets its
    own; pickling the model then raises: ``remove()`` first.

    Args:
        model: the model given to ``Trainer`` (its hooks also run when ``Trainer`` wraps it
            in ``DistributedDataParallel``).
        logits_chunk_size: the most positions given to the output head at once in evaluation
            forwards; None (the default) keeps the model's own forward and its logits.

    Returns:
        A handle whose ``remove()`` undoes all three (also a context manager), on the model and
        on the deep copies made of it meanwhile (``copy.deepcopy``; their hooks act on the copy
        itself). A model pickled meanwhile and loaded keeps its hooks and config keys.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> class Expanding(torch.nn.Module):  # one image placeholder becomes 3 positions
        ...     config = SimpleNamespace()
        ...     def prepare_inputs_labels_for_multimodal(self, labels, images):
        ...         return (torch.cat([torch.full((labels.shape[0], 2), -100), labels], 1),)
        ...     def forward(self, input_ids, labels, images=None):
        ...         (labels,) = self.prepare_inputs_labels_for_multimodal(labels, images)
        ...         return {"logits": torch.zeros(*labels.shape, 5)}
        >>> model = Expanding()
        >>> handle = expose_processed_labels(model)
        >>> ids, labels = torch.tensor([[-200, 4]]), torch.tensor([[-100, 4]])
        >>> model(input_ids=ids, labels=labels, images=torch.rand(1, 3, 2, 2))["processed_labels"]
        tensor([[-100, -100, -100,    4]])
        >>> model.config.keys_to_ignore_at_inference[:3]
        ['cache', 'past_key_values', 'hidden_states']
        >>> model(input_ids=ids, labels=labels)  # the images were dropped  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `input_ids` hold the negative id -200 (an image/video placeholder), but ...
        >>> handle.remove()
        >>> hasattr(model.config, "keys_to_ignore_at_inference")
        False

    """
    if logits_chunk_size is not None:
        _check_chunk_size(logits_chunk_size)
    handle = _expose_labels(model)
    handle._set_likely_cause(_TRAINER_PLACEHOLDER_CAUSE)
    if logits_chunk_size is not None:
        chunked_forward = _ChunkedEvalForward(model, logits_chunk_size)
        model.forward = chunked_forward
        handle._add_undo(lambda copies: chunked_forward.remove())
    config = getattr(model, "config", None)
    if config is not None:
        handle._add_undo(_IgnoredOutputKeys(config).restore)
    return handle
