"""The metric side of the ``transformers.Trainer`` path: :class:`StreamingMetrics`.

``preprocess_logits_for_metrics`` (per batch, on each process, before the gather) turns what
the model returned into the batch's fields (:mod:`mllm_metrics.hf.fields`): ids, never logits.
``compute_metrics`` (after the gather: every process gets every process's rows, the sampler's
duplicates dropped) turns them into one :class:`~mllm_metrics.evaluation.BatchResult` and
updates the evaluation core, whose metrics therefore never all-reduce again.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from mllm_metrics._warning import MllmMetricsWarning
from mllm_metrics.evaluation import BatchResult, Evaluation
from mllm_metrics.forward import EvaluationForward
from mllm_metrics.functional import (
    _check_label_values,
    _check_labels_dtype,
    _hf_ignored,
    _row_nll,
    causal_shift,
)
from mllm_metrics.grouped import different_groups_message, groups_checksum
from mllm_metrics.hf.fields import (
    FORWARD,
    PREPROCESSED,
    UNKNOWN_EVALUATION,
    Header,
    answers_of,
    preprocessed_fields,
    read_header,
)
from mllm_metrics.labels import PREPARE_METHOD, PROCESSED_LABELS_FIELD, _is_processed_labels
from mllm_metrics.records import check_records_dir, records_file_name

__all__ = ["StreamingMetrics"]


def _describe(value: Any) -> str:
    if isinstance(value, (Tensor, np.ndarray)):
        return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value[:6])
        return f"{type(value).__name__}({inner}{', ...' if len(value) > 6 else ''})"
    return type(value).__name__


def _split_model_outputs(outputs: Any) -> tuple[Tensor, Tensor | None]:
    """Find the logits and, when present, the processed labels in what ``Trainer`` passes on.

    ``Trainer`` turns the model's output into a tuple of its fields (less ``loss`` and the keys
    to ignore) and detaches them, so the field names are lost: the processed labels are
    recognised by identity (the very tensor the exposed model's forward returned, see
    :func:`~mllm_metrics.hf.expose_processed_labels`), never by their dtype or shape, since a
    model may return other integer fields of the same shape. A single remaining field arrives
    as a bare tensor.
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
            f"tensor of shape (batch, seq_len, vocab_size), got {_describe(outputs)}."
            + _likely_cause_of_no_logits(logits)
        )
    return logits, labels


def _likely_cause_of_no_logits(value: Any) -> str:
    if isinstance(value, Tensor) and not value.is_floating_point() and value.ndim == 2:
        return (
            " These look like generated token ids (`Seq2SeqTrainer(predict_with_generate=True)` "
            "hands `generate()`'s output instead of logits): teacher-forced metrics need the "
            "logits of a forward with labels. Leave `predict_with_generate` off and use "
            "`StreamingMetrics(generate_max_new_tokens=N)` with "
            "`expose_processed_labels(model, metrics=streaming)` for generated answers."
        )
    return (
        " It must be passed to Trainer as `preprocess_logits_for_metrics=`, and the model must "
        "return its logits first (a ModelOutput with `logits`, or a tuple starting with them)."
    )


def _to_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.as_tensor(value)


def _per_batch(predictions: Any) -> list[Any]:
    """The batches in ``predictions``: one tuple of fields, or a list of them.

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
    """Which evaluation a ``compute_metrics`` call belongs to.

    ``Trainer`` gives ``compute_metrics`` no sign of where an evaluation starts, so an
    ``evaluate()`` that raised half-way would leave its sums to the next one. The evaluation
    itself says it: the model exposed with a forward of ours counts its ``eval()`` calls, which
    start every evaluation, and each batch carries that number. For a model exposed without
    one, an object the stock ``Trainer.evaluation_loop`` creates for itself stands for the
    evaluation (its ``all_preds`` container, else accelerate's active dataloader), held by weak
    reference. The loop's ``metric_key_prefix`` and the trainer's global step name the records
    file, read from that loop's frame when it can be found.
    """

    def __init__(
        self, marker: object | None, prefix: str | None = None, step: int | None = None
    ) -> None:
        if isinstance(marker, int):
            self._marker: Any = marker
        else:
            self._marker = None if marker is None else weakref.ref(marker)
        self.prefix = prefix
        self.step = step

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Evaluation):
            return NotImplemented
        mine, theirs = self._marker, other._marker
        if isinstance(mine, int) or isinstance(theirs, int):
            return mine == theirs
        if mine is None or theirs is None:
            return mine is None and theirs is None
        alive = mine()
        return alive is not None and alive is theirs()

    __hash__ = None  # type: ignore[assignment]


_EVALUATION_LOOPS = ("evaluation_loop", "prediction_loop")


def _weakly_referable(value: object) -> bool:
    try:
        weakref.ref(value)
    except TypeError:
        return False
    return True


def evaluation_loop_frame() -> FrameType | None:
    """The frame of the ``Trainer`` evaluation (or prediction) loop running this call, or None.

    ``Trainer`` hands ``compute_metrics`` neither the metric prefix nor the step, and a
    subclass may run its own loop under the same name: its frame is where both are found.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in _EVALUATION_LOOPS and "self" in frame.f_locals:
            return frame
        frame = frame.f_back
    return None


def _current_evaluation(number: int = UNKNOWN_EVALUATION) -> _Evaluation:
    """The evaluation of this call: ``number`` (from the batch) when known, else the loop's
    own objects; with the loop's prefix and step when its frame is found."""
    frame = evaluation_loop_frame()
    prefix = step = None
    container = None
    if frame is not None:
        prefix = frame.f_locals.get("metric_key_prefix")
        step = getattr(getattr(frame.f_locals["self"], "state", None), "global_step", None)
        prefix = prefix if isinstance(prefix, str) else None
        step = step if isinstance(step, int) else None
        container = frame.f_locals.get("all_preds")
    if number != UNKNOWN_EVALUATION:
        return _Evaluation(number, prefix, step)
    if container is not None and _weakly_referable(container):
        return _Evaluation(container, prefix, step)
    state = sys.modules.get("accelerate.state")  # imported by Trainer; never imported here
    gradient_state = getattr(state, "GradientState", None)
    if gradient_state is None or not getattr(gradient_state, "_shared_state", None):
        return _Evaluation(None, prefix, step)
    try:
        loader = gradient_state().active_dataloader
    except (AttributeError, IndexError):
        loader = None
    return _Evaluation(loader if _weakly_referable(loader) else None, prefix, step)


def _warn_if_the_gather_keeps_repeats() -> None:
    """Warn, at the last batch, when ``Trainer``'s gather keeps samples that were repeated to
    fill the processes' last batches.

    accelerate drops those repeats (``gather_for_metrics``) for a map-style eval set, and for one
    read by process 0 alone (``dispatch_batches=True``). An iterable eval set that each process
    reads itself (``dispatch_batches=False``, which batches of varying length need) is padded
    with samples of its first batch (``IterableDatasetShard``), and the gather keeps them: every
    metric then counts them twice.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    # Both are imported by Trainer; never imported here.
    gradient_state = getattr(sys.modules.get("accelerate.state"), "GradientState", None)
    shard_type = getattr(sys.modules.get("accelerate.data_loader"), "IterableDatasetShard", None)
    if gradient_state is None or shard_type is None:
        return
    if not getattr(gradient_state, "_shared_state", None):
        return
    try:
        current = gradient_state()
        shard = current.active_dataloader.dataset if current.end_of_dataloader else None
    except (AttributeError, IndexError):
        return
    if not isinstance(shard, shard_type) or shard.drop_last:
        return
    full = shard.batch_size * (1 if shard.split_batches else shard.num_processes)
    try:
        repeats = -len(shard.dataset) % full
    except TypeError:  # no length
        repeats = None
    if repeats == 0:
        return
    count = (
        "up to processes x batch size - 1 samples"
        if repeats is None
        else f"{repeats} sample" + ("s" * (repeats > 1))
    )
    warnings.warn(
        "The eval set is iterable and each process reads it itself (`dispatch_batches=False`): "
        "accelerate fills the processes' last batches with samples of the first batch, and "
        f"Trainer's gather keeps them, so every metric counts {count} twice. Make the eval set "
        "a map-style data set (with `__getitem__` and `__len__`).",
        category=MllmMetricsWarning,
        stacklevel=3,
    )


class StreamingMetrics:
    """Token metrics for ``transformers.Trainer`` from integer sums, never from kept logits.

    Pass the object as ``compute_metrics=`` and its :meth:`preprocess_logits` as
    ``preprocess_logits_for_metrics=``, and expose the model with
    ``expose_processed_labels(model, logits_chunk_size=256, metrics=streaming)``. Each
    evaluation batch, on each process, :meth:`preprocess_logits` turns the model's outputs into
    the batch's fields: argmax ids, shifted labels, each row's NLL (and group ids, generated
    answers), B x L integers at most. ``Trainer`` gathers those and calls the object:

    - with ``TrainingArguments(batch_eval_metrics=True)`` (transformers >= 4.44) once per batch:
      the sums are updated, and on the last batch (``compute_result=True``) the results are
      returned and the sums reset. Memory stays flat over any eval set.
    - without it, once at the end with the fields of the whole eval set, concatenated by
      ``Trainer`` (rows padded with -100, which count as ignored).

    ``evaluate()`` then returns ``eval_<name>`` for each metric (``eval_bit_match`` and
    ``eval_exact_match`` by default), ``eval_nll`` (the mean NLL per supervised token of the
    processed labels: ``Trainer``'s ``eval_loss`` is a mean of per-batch losses), and with the
    options below ``eval_text_*``, ``eval_<metric>/<group>``, ``eval_<metric>/macro`` and
    ``eval_gen_*``; the prefix is ``metric_key_prefix``'s. The values come from the evaluation
    core (:class:`~mllm_metrics.evaluation.Evaluation`), the same rules as
    :class:`~mllm_metrics.lightning.MultimodalLMModule`'s.

    ``Trainer`` has already gathered every process's rows when it calls the object, so the
    metrics compute from their local states only (the user's metrics are copied for this; the
    copies are in :attr:`metrics`).

    Args:
        metrics: token metrics updated with ``(preds, target)``; None gives
            :func:`mllm_metrics.causal_lm_metrics` (keys ``bit_match``, ``exact_match``).
        ignore_index: label of unsupervised positions; -100, the value ``Trainer`` pads with,
            is always treated as ignored as well.
        nll: also compute ``nll``, the token-weighted negative log-likelihood.
        records_dir: write one JSON Lines file of per-sample records there at the end of each
            evaluation (see :mod:`mllm_metrics.records`), from process 0 only, one line per
            sample in ``Trainer``'s order (the data set's order, each sample once), named
            ``{metric_key_prefix}_step{global_step:07d}.jsonl`` (``-2``... for a second
            evaluation at the same step; ``eval_call0000001.jsonl`` outside ``Trainer``).
            Checked at construction.
        tokenizer: a Hugging Face tokenizer (anything with ``batch_decode``): adds
            ``text_bit_match`` and ``text_exact_match`` on the decoded supervised spans, and
            ``prediction``, ``reference`` (and ``generated``) to the records.
        text_alphabet: characters the text bit-match keeps (e.g. ``"01"``); None keeps all.
        group_key: the data set column of each row's group (names, or positions in
            ``groups``); needs ``groups`` and ``expose_processed_labels(model,
            metrics=streaming)``, which reads it in the forward and keeps it through
            ``remove_unused_columns``. Adds ``<metric>/<group>`` for the groups with data and
            ``bit_match/macro``, ``exact_match/macro``.
        groups: the group names.
        generate_max_new_tokens: also decode each row's greedy answer from its prompt in the
            evaluation forward (needs ``expose_processed_labels(model, metrics=streaming)``) and
            add ``gen_exact_match``, ``gen_bit_match`` (``gen_text_*`` with a tokenizer); see
            :mod:`mllm_metrics.generation`.
        eos_token_id: the id(s) that end a generated answer; default the model's.

    Examples:
        >>> import torch
        >>> streaming = StreamingMetrics()
        >>> logits = torch.zeros(2, 4, 8)  # (batch, seq_len, vocab): what the model returns
        >>> logits[0, :, 5] = 1.0  # row 0 always predicts token 5, row 1 token 0
        >>> labels = torch.tensor([[-100, 5, 5, 5], [-100, -100, 3, 0]])
        >>> fields = streaming.preprocess_logits(logits, labels)  # ids only, what Trainer keeps
        >>> fields[1].tolist(), fields[2].tolist()  # the shifted predictions and labels
        ([[5, 5, 5], [0, 0, 0]], [[5, 5, 5], [-100, 3, 0]])
        >>> results = streaming(fields, compute_result=True)
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
        group_key: str | None = None,
        groups: Sequence[str] | None = None,
        generate_max_new_tokens: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> None:
        # Checked here, with the arguments: the model side is built at exposure.
        self._model_side_options = {
            "ignore_index": ignore_index,
            "group_key": group_key,
            "groups": groups,
            "generate_max_new_tokens": generate_max_new_tokens,
            "eos_token_id": eos_token_id,
        }
        EvaluationForward(**self._model_side_options)
        self.evaluation = Evaluation(
            metrics,
            ignore_index=ignore_index,
            nll_key="nll" if nll else None,
            tokenizer=tokenizer,
            text_alphabet=text_alphabet,
            groups=groups,
            generation=generate_max_new_tokens is not None,
            records=records_dir is not None,
            distributed=False,
        )
        self.ignore_index = ignore_index
        self.tokenizer = tokenizer
        self.group_key = group_key
        self.generate_max_new_tokens = generate_max_new_tokens
        self.records_dir = None if records_dir is None else Path(records_dir)
        if self.records_dir is not None:
            problem = check_records_dir(self.records_dir)
            if problem is not None:
                raise ValueError(problem)
        self._evaluations_written = 0
        self._device: torch.device | None = None
        self._evaluation: _Evaluation | None = None

    @property
    def metrics(self) -> MetricCollection:
        """The token metrics (local copies of the ones passed in)."""
        return self.evaluation.tokens

    def _model_side(self, logits_chunk_size: int | None) -> EvaluationForward:
        """The model side this object needs (see `expose_processed_labels`)."""
        return EvaluationForward(logits_chunk_size=logits_chunk_size, **self._model_side_options)

    # ---- per batch, before the gather ------------------------------------------------------

    def preprocess_logits(self, logits: Any, labels: Tensor | None) -> tuple[Tensor, ...]:
        """Turn one batch's model outputs into its fields (ids, never logits), before the gather.

        Args:
            logits: what ``Trainer`` passes on from the model's output: the fields of an
                exposed model's evaluation forward (:class:`~mllm_metrics.hf.ChunkedEvalOutput`),
                or the logits alone, or a tuple of the output fields that are not ignored
                (logits first, then ``processed_labels`` when the model was exposed).
            labels: the batch's labels as the data set gave them (used when the model returned
                no ``processed_labels``: models whose labels already line up with the logits).

        Returns:
            The batch's fields (see :mod:`mllm_metrics.hf.fields`): the header, then int64
            ids of shape (B, L'-1), the aligned labels shifted by one, (B, L'-1), each row's
            summed NLL (B,) unless ``nll=False``, and the group ids and answers when the
            exposed forward computed them. All on the logits' device.

        Raises:
            ValueError: if no logits are found, if the labels do not line up with the logits
                (a model that rewrites its labels without exposing them), if a label is
                negative but not ignored (e.g. a -200 image placeholder left in the labels) or
                outside the vocabulary, or if groups or generation are asked for but the model
                was not exposed with ``metrics=streaming``.

        """
        _warn_if_the_gather_keeps_repeats()
        fields = logits if isinstance(logits, (tuple, list)) else None
        header = read_header(fields[0]) if fields else None
        if header is not None and header.stage == FORWARD:
            return self._preprocess_fields(header, list(fields))
        outputs, processed = _split_model_outputs(logits)
        self._check_exposed_for(None)
        aligned = processed if processed is not None else labels
        if not isinstance(aligned, Tensor):
            raise ValueError(
                "`StreamingMetrics.preprocess_logits` needs labels to score the logits of shape "
                f"{tuple(outputs.shape)}, got {_describe(labels)}. Likely cause: the eval data "
                "set has no `labels` column (or TrainingArguments(label_names=...) names other "
                "columns)."
            )
        _check_labels_dtype(aligned, "labels")
        if aligned.shape != outputs.shape[:2]:
            raise ValueError(
                f"The model returned logits of shape {tuple(outputs.shape)} but the labels have "
                f"shape {tuple(aligned.shape)}, and no `{PROCESSED_LABELS_FIELD}` output reached "
                "`preprocess_logits`: the model rewrites its labels inside `forward`. Call "
                "`mllm_metrics.hf.expose_processed_labels(model)` before `trainer.evaluate()` "
                f"(it records them from `{PREPARE_METHOD}`), or make the model return "
                f"`{PROCESSED_LABELS_FIELD}` of shape {tuple(outputs.shape[:2])} itself."
            )
        preds, target = causal_shift(outputs, self._target(aligned.long()))
        # One rule for every path: a label outside the vocabulary is an error, NLL or not.
        _check_label_values(target, self.ignore_index, outputs.shape[-1])
        row_nll = None
        if self.evaluation.nll is not None:
            row_nll = _row_nll(outputs[:, :-1], target, self.ignore_index)
        return preprocessed_fields(preds, target, row_nll)

    def _preprocess_fields(self, header: Header, fields: list[Tensor]) -> tuple[Tensor, ...]:
        """Shift the fields of an exposed model's evaluation forward (after ``Trainer``'s
        padding across processes, which pads ids and labels alike)."""
        self._check_exposed_for(header)
        if len(fields) != header.size:
            raise ValueError(
                f"Expected {header.size} fields from the exposed model's forward, got "
                f"{_describe(fields)}."
            )
        _, ids, processed, row_nll, *rest = fields
        nll = self.evaluation.nll is not None
        # A negative ignore_index the forward did not know would have raised there (a negative
        # label it does not ignore), so only a token id (a pad id, say) can be counted wrongly.
        if nll and header.ignores_only_hf_index and self.ignore_index >= 0:
            raise ValueError(
                f"This StreamingMetrics ignores the label {self.ignore_index} (and -100), but the "
                "exposed forward summed each row's NLL over every label but -100: it was exposed "
                "without this object. Call `expose_processed_labels(model, logits_chunk_size=..., "
                "metrics=streaming)` so that both ignore the same labels (or pass `nll=False`)."
            )
        shifted = dataclasses.replace(header, stage=PREPROCESSED, nll=nll)
        out = [shifted.tensor(ids.shape[0], ids.device), ids[:, :-1]]
        out.append(self._target(processed.long()[:, 1:]))
        if nll:
            out.append(row_nll)
        return tuple(out + rest)

    def _target(self, target: Tensor) -> Tensor:
        return _hf_ignored(target, self.ignore_index)

    def _check_exposed_for(self, header: Header | None) -> None:
        """The first batch says when the model was not exposed for what this object needs."""
        missing = []
        if self.group_key is not None and not (header is not None and header.groups):
            missing.append(f"each row's group (`group_key={self.group_key!r}`)")
        if self.generate_max_new_tokens is not None and not (header and header.generation):
            missing.append("the generated answers (`generate_max_new_tokens`)")
        if missing:
            raise ValueError(
                f"StreamingMetrics needs {' and '.join(missing)}, which only the evaluation "
                "forward can take from the batch, but the model's outputs carry none. Call "
                "`expose_processed_labels(model, logits_chunk_size=..., metrics=streaming)` "
                "with this StreamingMetrics object before `trainer.evaluate()`."
            )

    # ---- compute_metrics ----------------------------------------------------------------------

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, Any]:
        """Update the sums with gathered fields; return the results when ``compute_result``.

        Args:
            eval_pred: ``Trainer``'s ``EvalPrediction`` (or its predictions alone), whose
                predictions are what :meth:`preprocess_logits` returned, gathered over
                processes (and, without ``batch_eval_metrics``, concatenated over batches).
            compute_result: ``Trainer`` passes False on all but the last batch when
                ``batch_eval_metrics=True``; called without it (once, at the end), it is True.

        Returns:
            ``{name: value}`` when ``compute_result`` (the sums are then reset), else ``{}``.

        Raises:
            ValueError: if the predictions are not :meth:`preprocess_logits`' fields.

        """
        predictions = getattr(eval_pred, "predictions", eval_pred)
        batches = [self._parse(batch) for batch in _per_batch(predictions)]  # all checked first
        number = batches[0][0].evaluation if batches else UNKNOWN_EVALUATION
        evaluation = _current_evaluation(number)
        if evaluation != self._evaluation:
            self._start_evaluation()
        # Also for the same evaluation: its prefix and step may be known only now.
        self._evaluation = evaluation
        with self.evaluation.whole_or_nothing():  # a list of batches, as one
            for _, result in batches:
                self.update(result)
        if not compute_result:
            return {}
        results = self.compute()
        self._write_records()
        self.reset()
        return results

    def _parse(self, predictions: Any) -> tuple[Header, BatchResult]:
        values = (
            [_to_tensor(value) for value in predictions]
            if isinstance(predictions, (tuple, list)) and predictions
            else None
        )
        header = read_header(values[0]) if values else None
        if header is None or header.stage != PREPROCESSED or len(values) != header.size:
            raise ValueError(self._not_preprocessed(predictions, header))
        groups = self.evaluation.groups
        known = header.groups_checksum  # 0: fields built by hand, without the names
        if header.groups and groups is not None and known not in (0, groups_checksum(groups)):
            raise ValueError(different_groups_message(groups))
        _, preds, target, *rest = values
        row_nll = rest.pop(0) if header.nll else None
        group = rest.pop(0).long() if header.groups else None
        generated = references = None
        if header.generation:
            generated, references = answers_of(rest[0]), answers_of(rest[1])
        if (
            preds.ndim != 2
            or preds.shape != target.shape
            or preds.is_floating_point()
            or target.is_floating_point()
            or (row_nll is not None and (row_nll.ndim != 1 or len(row_nll) != len(preds)))
        ):
            raise ValueError(self._not_preprocessed(predictions, header))
        result = BatchResult(
            # Trainer pads ids with -100 across processes and batches; their labels are ignored.
            preds=preds.long().clamp(min=0),
            target=self._target(target.long()),
            row_nll=None if row_nll is None else row_nll.double(),
            group=group,
            generated=generated,
            references=references,
        )
        return header, result

    @staticmethod
    def _not_preprocessed(predictions: Any, header: Header | None) -> str:
        if header is not None and header.stage == FORWARD:
            return (
                "`StreamingMetrics` got the exposed model's forward outputs unshifted: Trainer was "
                "not given `preprocess_logits_for_metrics=streaming.preprocess_logits`, which "
                "aligns each prediction with the label it predicts. Pass it to Trainer."
            )
        return (
            "`StreamingMetrics` expected the gathered output of its `preprocess_logits`, got "
            f"{_describe(predictions)}. Likely cause: Trainer was not given "
            "`preprocess_logits_for_metrics=streaming.preprocess_logits` (it then keeps every "
            "batch's logits), or it was given another object's method."
        )

    def _to_device(self, device: torch.device) -> None:
        if self._device != device:  # batch_eval_metrics gives tensors on args.device
            self.evaluation.to(device)
            self._device = device

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
        assert self.records_dir is not None
        evaluation = self._evaluation
        prefix = (evaluation.prefix if evaluation is not None else None) or "eval"
        step = evaluation.step if evaluation is not None else None
        self._evaluations_written += 1
        if step is None:
            name = records_file_name(prefix, self._evaluations_written, counter=True)
        else:
            name = records_file_name(prefix, step)
        path = self.evaluation.write_records(self.records_dir / name, gather=False)
        # ---- experiment trackers: the samples' table, from the records just gathered ----
        if self.evaluation.last_records is not None and step is not None:
            from mllm_metrics.trackers import log_trainer_tables

            log_trainer_tables(self, prefix, self.evaluation.last_records, path)
        # ---- end of experiment trackers ----

    def _start_evaluation(self) -> None:
        """A new evaluate()/predict(): what an earlier one left uncomputed is dropped, loudly."""
        rows = self.evaluation.rows_seen
        if rows:
            warnings.warn(
                f"StreamingMetrics dropped the {rows} rows of an evaluation that ended without "
                "its results (`compute_result=True`): a new evaluation started. Likely cause: "
                "the earlier evaluation was interrupted, or something called `model.eval()` on "
                "the exposed model during an evaluation (each `eval()` call starts one).",
                category=MllmMetricsWarning,
                stacklevel=3,
            )
        self.reset()

    def update(self, result: BatchResult) -> None:
        """Add one gathered batch to the sums; a bad batch changes nothing."""
        self._to_device(result.target.device)
        self.evaluation.update(result, keep_records=self._records_kept_here())

    def compute(self) -> dict[str, Any]:
        """Every value over everything seen since the last reset (floats for scalars)."""
        return {
            name: value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
            for name, value in self.evaluation.compute().items()
        }

    def reset(self) -> None:
        """Zero the sums and forget the records (done after each ``compute_result=True``
        call, once the records are written)."""
        self.evaluation.reset()
