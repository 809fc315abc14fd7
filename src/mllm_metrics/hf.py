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

import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from mllm_metrics.functional import _check_label_values, _row_nll, causal_shift
from mllm_metrics.labels import PREPARE_METHOD, PROCESSED_LABELS_FIELD, ProcessedLabelsHandle
from mllm_metrics.labels import expose_processed_labels as _expose_labels
from mllm_metrics.metrics import TokenNLL, causal_lm_metrics

__all__ = ["IGNORED_OUTPUT_KEYS", "StreamingMetrics", "expose_processed_labels"]

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

# Keyword arguments of a LLaVA-style forward that are not a modality: with only these present,
# nothing can replace the negative placeholder ids in `input_ids`.
_TEXT_ARGUMENTS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values",
        "cache",
        "cache_position",
        "inputs_embeds",
        "labels",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "num_items_in_batch",
        "logits_to_keep",
        "token_type_ids",
        "return_loss",
    }
)


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
    return isinstance(value, Tensor) and not value.is_floating_point() and not value.is_complex()


def _split_model_outputs(outputs: Any) -> tuple[Tensor, Tensor | None]:
    """Find the logits and, when present, the processed labels in what ``Trainer`` passes on.

    ``Trainer`` turns the model's output into a tuple of its fields (less ``loss`` and the keys
    to ignore), in field order: the logits come first and ``processed_labels``, which the forward
    hook appends, last. A single remaining field arrives as a bare tensor.
    """
    if isinstance(outputs, Mapping):
        logits, labels = outputs.get("logits"), outputs.get(PROCESSED_LABELS_FIELD)
        candidates = [logits] if isinstance(logits, Tensor) else []
    elif isinstance(outputs, (tuple, list)):
        candidates, labels = list(outputs), None
        logits = next(
            (v for v in candidates if isinstance(v, Tensor) and v.is_floating_point()), None
        )
    else:
        candidates, logits, labels = [outputs], outputs, None
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 3:
        raise ValueError(
            "`StreamingMetrics.preprocess_logits` expected the model's logits, a floating-point "
            f"tensor of shape (batch, seq_len, vocab_size), got {_describe(outputs)}. It must be "
            "passed to Trainer as `preprocess_logits_for_metrics=`, and the model must return its "
            "logits first (a ModelOutput with `logits`, or a tuple starting with them)."
        )
    if labels is None:
        for value in reversed(candidates):
            if value is not logits and _is_int_tensor(value) and value.shape == logits.shape[:2]:
                labels = value
                break
    return logits, labels


def _to_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.as_tensor(value)


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
    ) -> None:
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(
                f"Expected `ignore_index` to be an int, got {type(ignore_index).__name__}."
            )
        self.ignore_index = ignore_index
        self.metrics: MetricCollection = _as_collection(metrics, ignore_index)
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
        logits, processed = _split_model_outputs(logits)
        aligned = processed if processed is not None else labels
        if not _is_int_tensor(aligned):
            raise ValueError(
                "`StreamingMetrics.preprocess_logits` needs labels to score the logits of shape "
                f"{tuple(logits.shape)}, got {_describe(labels)}. Likely cause: the eval data "
                "set has no `labels` column (or TrainingArguments(label_names=...) names other "
                "columns)."
            )
        if aligned.shape != logits.shape[:2]:
            raise ValueError(
                f"The model returned logits of shape {tuple(logits.shape)} but the labels have "
                f"shape {tuple(aligned.shape)}, and no `{PROCESSED_LABELS_FIELD}` output reached "
                "`preprocess_logits`: the model rewrites its labels inside `forward`. Call "
                "`mllm_metrics.hf.expose_processed_labels(model)` before `trainer.evaluate()` "
                f"(it records them from `{PREPARE_METHOD}`), or make the model return "
                f"`{PROCESSED_LABELS_FIELD}` of shape {tuple(logits.shape[:2])} itself."
            )
        if self.ignore_index != TRAINER_PAD_INDEX:
            aligned = aligned.masked_fill(aligned == TRAINER_PAD_INDEX, self.ignore_index)
        preds, target = causal_shift(logits, aligned)
        if self._nll is None:
            return preds, target
        _check_label_values(target, self.ignore_index, logits.shape[-1])
        return preds, target, _row_nll(logits[:, :-1], target, self.ignore_index)

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
        for chunk in self._chunks(predictions):
            self.update(*chunk)
        if not compute_result:
            return {}
        results = self.compute()
        self.reset()
        return results

    def _chunks(self, predictions: Any) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        # `eval_do_concat_batches=False` (transformers >= 4.42) gives a list of per-batch tuples.
        if isinstance(predictions, list) and predictions and isinstance(predictions[0], tuple):
            for batch in predictions:
                yield self._parse(batch)
        else:
            yield self._parse(predictions)

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
            or (expected == 3 and (values[2].ndim != 1 or len(values[2]) != len(values[0])))
        ):
            raise ValueError(
                "`StreamingMetrics` expected the gathered output of its `preprocess_logits`: "
                f"{'(preds, target, row_nll)' if expected == 3 else '(preds, target)'} with "
                f"(N, L) integer ids, got {_describe(predictions)}. Likely cause: Trainer was "
                "not given `preprocess_logits_for_metrics=streaming.preprocess_logits` (it then "
                "keeps every batch's logits), or it was given another object's method."
            )
        return values[0], values[1], values[2] if expected == 3 else None

    def update(self, preds: Tensor, target: Tensor, row_nll: Tensor | None = None) -> None:
        """Add gathered token ids (and rows' NLL) to the sums.

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
        self.metrics.update(preds.clamp(min=0), target)
        if self._nll is not None and row_nll is not None:
            self._nll.update(row_nll, target)

    def compute(self) -> dict[str, Any]:
        """The metrics' values over everything seen since the last reset (floats for scalars)."""
        values = dict(self.metrics.compute())
        if self._nll is not None:
            values["nll"] = self._nll.compute()
        return {
            name: value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
            for name, value in values.items()
        }

    def reset(self) -> None:
        """Zero the sums (done after each ``compute_result=True`` call)."""
        self.metrics.reset()
        if self._nll is not None:
            self._nll.reset()


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

    def restore(self) -> None:
        if getattr(self.config, _IGNORE_KEYS_ATTRIBUTE, None) is not self.value:
            warnings.warn(
                f"`config.{_IGNORE_KEYS_ATTRIBUTE}` was changed after mllm_metrics set it, so "
                "it is left as it is now.",
                stacklevel=4,
            )
        elif self.had_own:
            setattr(self.config, _IGNORE_KEYS_ATTRIBUTE, self.previous)
        else:
            delattr(self.config, _IGNORE_KEYS_ATTRIBUTE)


def _is_modality(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point()
    if isinstance(value, (list, tuple)) and value:
        return _is_modality(value[0])
    return False


def _placeholder_check(model: nn.Module) -> Any:
    forward_arguments = list(inspect.signature(model.forward).parameters)

    def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not _is_int_tensor(input_ids) or kwargs.get("inputs_embeds") is not None:
            return
        if any(
            _is_modality(value)
            for name, value in kwargs.items()
            if name not in _TEXT_ARGUMENTS and value is not None
        ):
            return
        negative = input_ids < 0
        if not bool(negative.any()):  # a host sync, only on batches without a modality tensor
            return
        received = sorted(name for name, value in kwargs.items() if value is not None)
        raise ValueError(
            f"`input_ids` hold the negative id {int(input_ids[negative][0])} (an image/video "
            "placeholder), but no image/video tensor reached "
            f"`{type(module).__name__}.forward`: it received {received}, and it takes "
            f"{forward_arguments}. Likely cause: Trainer's `remove_unused_columns=True` (the "
            "default) dropped the data set column holding the images because its name is not "
            "an argument of `forward` (e.g. a column `image` for the argument `images`). "
            "Rename the column to the argument's name, or set "
            "`TrainingArguments(remove_unused_columns=False)` and let the data collator build "
            "the argument."
        )

    return check


def expose_processed_labels(model: nn.Module) -> ProcessedLabelsHandle:
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

    Args:
        model: the model given to ``Trainer`` (its hooks also run when ``Trainer`` wraps it
            in ``DistributedDataParallel``).

    Returns:
        A handle whose ``remove()`` undoes all three (also a context manager).

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
    labels_handle = _expose_labels(model)
    hooks = []
    if any(callable(getattr(type(module), PREPARE_METHOD, None)) for module in model.modules()):
        hooks.append(model.register_forward_pre_hook(_placeholder_check(model), with_kwargs=True))
    config = getattr(model, "config", None)
    ignored = _IgnoredOutputKeys(config) if config is not None else None

    def release() -> None:
        labels_handle.remove()
        if ignored is not None:
            ignored.restore()

    return ProcessedLabelsHandle(hooks, release)
