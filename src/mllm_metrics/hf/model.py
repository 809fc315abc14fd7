"""The model side of the ``transformers.Trainer`` path: :func:`expose_processed_labels`.

``Trainer`` calls the model once per evaluation batch, on every process, with the whole batch:
the one place where the processed labels, the supervised-only head, each row's group and the
generated answers can be had. The exposed model's evaluation forward runs the shared model side
(:class:`~mllm_metrics.forward.EvaluationForward`) there and returns a
:class:`ChunkedEvalOutput` whose fields (see :mod:`mllm_metrics.hf.fields`) ``Trainer`` pads,
gathers and hands to :class:`~mllm_metrics.hf.StreamingMetrics`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mllm_metrics._warning import MllmMetricsWarning
from mllm_metrics.chunked import NOT_PREDICTED, _check_chunk_size
from mllm_metrics.evaluation import BatchResult
from mllm_metrics.forward import EvaluationForward
from mllm_metrics.functional import HF_IGNORE_INDEX
from mllm_metrics.grouped import groups_checksum
from mllm_metrics.hf.fields import FORWARD, Header, answers_tensor, read_header
from mllm_metrics.labels import ProcessedLabelsHandle
from mllm_metrics.labels import expose_processed_labels as _expose_labels

if TYPE_CHECKING:
    from mllm_metrics.hf.metrics import StreamingMetrics

__all__ = ["IGNORED_OUTPUT_KEYS", "ChunkedEvalOutput", "expose_processed_labels"]

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

# TRL's SFTTrainer (1.x) calls the model twice per evaluation batch: with `fused_lm_head=True`
# and the labels (its own loss, from its fused head), then without labels for the logits it
# hands to `compute_metrics`.
_TRL_FUSED_HEAD = "fused_lm_head"


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
    """What an exposed model's evaluation forward returns (``expose_processed_labels`` with
    ``logits_chunk_size`` or ``metrics``).

    A dict with two keys, so that ``Trainer.prediction_step`` (which hands on every value but
    ``loss``) and TRL's ``SFTTrainer`` (which hands on ``outputs.logits``) pass the same thing
    to ``preprocess_logits_for_metrics``, with attribute access like a ``ModelOutput``:

    - ``loss``: the loss the model would have returned (its own with the full forward; with
      the supervised-only head, the mean NLL of the supervised shifted labels, or their sum over
      ``num_items_in_batch`` when that argument is passed);
    - ``logits``: not logits but the batch's fields, a tuple of tensors (see
      :mod:`mllm_metrics.hf.fields`): the header, then ``predictions`` (argmax ids (batch,
      seq_len), position ``t`` predicting label ``t + 1``;
      :data:`~mllm_metrics.chunked.NOT_PREDICTED` where the head skipped it), the
      ``processed_labels`` (batch, seq_len), ``row_nll`` (batch,), and with the streaming
      metrics' groups ``group_ids`` (batch,), with generation ``generated_ids`` and
      ``reference_ids`` (batch, N), -100 after each answer.

    The fields are also attributes of their own (``output.predictions`` ...).
    """

    #: The processed labels are one of its fields: the exposure's hooks add none.
    holds_processed_labels = True

    FIELDS = (
        "header",
        "predictions",
        "processed_labels",
        "row_nll",
        "group_ids",
        "generated_ids",
        "reference_ids",
    )

    def __getattr__(self, name: str) -> Any:
        if name in ("loss", "logits"):
            return self.get(name)
        if name in self.FIELDS:
            fields = self["logits"]
            header = read_header(fields[0])
            present = [n for n in self.FIELDS if header is not None and header.has(n)]
            return fields[present.index(name)] if name in present else None
        raise AttributeError(name)


def _forward_signature(forward: Any, group_key: str | None) -> inspect.Signature | None:
    """The model's forward signature, with ``group_key`` as a keyword argument: ``Trainer``
    keeps only the data set columns the forward names (``remove_unused_columns=True``)."""
    signature = inspect.signature(forward)
    if group_key is None or group_key in signature.parameters:
        return signature
    parameters = list(signature.parameters.values())
    position = next(
        (i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD),
        len(parameters),
    )
    extra = inspect.Parameter(group_key, inspect.Parameter.KEYWORD_ONLY, default=None)
    return signature.replace(parameters=[*parameters[:position], extra, *parameters[position:]])


#: Numbers every ``eval()`` call of every exposed model in this process: a number is never
#: used twice, also after ``handle.remove()`` and exposing again (say, in a notebook cell run
#: again after an interrupted evaluation), so one evaluation's sums never reach another's.
#: Every process makes the same calls in the same order, so the numbers agree across them.
_EVALUATION_NUMBERS = itertools.count(1)


class _EvaluationCounter:
    """Set as ``model.train`` while exposed: numbers the model's ``eval()`` calls.

    ``Trainer`` (and a subclass's own loop) puts the model in evaluation mode at the start of
    every evaluation; the number travels with each batch's fields, so that
    :class:`~mllm_metrics.hf.StreamingMetrics` knows where an evaluation starts, even after one
    that was interrupted.
    """

    def __init__(self, model: nn.Module, own_train: Any = None) -> None:
        self.model_ref = weakref.ref(model)
        #: A ``train`` the instance had of its own (called instead of the class's).
        self.own_train = own_train
        self.number = 0

    def __call__(self, mode: bool = True) -> nn.Module:
        model = self.model_ref()
        if model is None:
            raise ReferenceError("the model this method belonged to no longer exists")
        if not mode:
            self.number = next(_EVALUATION_NUMBERS)
        if self.own_train is not None:
            return self.own_train(mode)
        return type(model).train(model, mode)


class _EvaluationForward:
    """Set as ``model.forward`` while exposed with a chunk size or streaming metrics.

    An evaluation forward with labels (``model.training`` False) runs the shared model side and
    returns a :class:`ChunkedEvalOutput`; every other call (training, no labels, TRL's fused
    head) is the model's own forward, given the batch without the group key.
    ``functools.update_wrapper`` and ``__signature__`` keep the signature ``Trainer`` inspects.
    """

    def __init__(self, model: nn.Module, model_side: EvaluationForward) -> None:
        self.model_ref = weakref.ref(model)
        self.model_side = model_side
        self.active = True
        self.had_own_forward = "forward" in vars(model)
        self.own_forward = vars(model).get("forward")
        self.had_own_train = "train" in vars(model)
        self.own_train = vars(model).get("train")
        self.counter = _EvaluationCounter(model, self.own_train)
        self.copies: list[weakref.ref[nn.Module]] = []
        self.fused_call: tuple[weakref.ref[Tensor], Tensor] | None = None
        functools.update_wrapper(self, model.forward)
        self.__signature__ = _forward_signature(model.forward, model_side.group_key)

    def _original(self, model: nn.Module) -> Any:
        return self.own_forward if self.had_own_forward else type(model).forward.__get__(model)

    def install(self, model: nn.Module) -> None:
        model.forward = self
        model.train = self.counter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model_ref()
        if model is None:
            raise ReferenceError("the model this forward belonged to no longer exists")
        forward = self._original(model)
        side = self.model_side
        if not self.active or model.training or args or kwargs.get(_TRL_FUSED_HEAD):
            return forward(*args, **side.model_batch(kwargs))
        labels = kwargs.get("labels")
        if labels is None:
            labels = self._labels_of_fused_call(kwargs)
            if labels is None:
                return forward(*args, **side.model_batch(kwargs))
            kwargs = {**kwargs, "labels": labels}
        items = kwargs.pop("num_items_in_batch", None)
        result, loss = side(model, kwargs, model_loss=True, call=forward)
        if loss is None:
            denominator = (result.target != side.ignore_index).sum() if items is None else items
            loss = (result.row_nll.sum() / denominator).float()
        return ChunkedEvalOutput(loss=loss, logits=self.fields(result, kwargs["labels"].device))

    def fields(self, result: BatchResult, device: torch.device) -> tuple[Tensor, ...]:
        """The batch's fields for ``Trainer``'s gather (unshifted, as a model's outputs are)."""
        side = self.model_side
        rows = result.rows
        header = Header(
            stage=FORWARD,
            nll=True,
            groups=side.groups is not None,
            generation=side.generate_max_new_tokens is not None,
            evaluation=self.counter.number,
            groups_checksum=0 if side.groups is None else groups_checksum(side.groups),
            ignores_only_hf_index=side.ignore_index == HF_IGNORE_INDEX,
        )
        not_predicted = result.preds.new_full((rows, 1), NOT_PREDICTED)
        ignored = result.target.new_full((rows, 1), side.ignore_index)
        fields = [
            header.tensor(rows, device),
            torch.cat([result.preds, not_predicted], dim=1),
            torch.cat([ignored, result.target], dim=1),
            result.row_nll,
        ]
        if header.groups:
            fields.append(result.group)
        if header.generation:
            width = side.generate_max_new_tokens
            generated = result.generated or [None] * rows
            references = result.references or [None] * rows
            fields.append(answers_tensor(generated, device, width))
            fields.append(answers_tensor(references, device))
        return tuple(fields)

    def _labels_of_fused_call(self, kwargs: Mapping[str, Any]) -> Tensor | None:
        """The labels of TRL's fused-head call just before this one, for the same batch (the
        very same ``input_ids`` tensor, which TRL passes to both calls)."""
        remembered, self.fused_call = self.fused_call, None
        if remembered is None:
            return None
        input_ids, labels = remembered
        given = kwargs.get("input_ids")
        return labels if given is not None and given is input_ids() else None

    def remember_fused_call(self, model: nn.Module, kwargs: Mapping[str, Any]) -> None:
        """Forward pre-hook: remember the labels of an evaluation call with TRL's fused head;
        any other call but the label-less one on the same ``input_ids`` forgets them."""
        input_ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
        if (
            self.active
            and not model.training
            and kwargs.get(_TRL_FUSED_HEAD)
            and isinstance(input_ids, Tensor)
            and isinstance(labels, Tensor)
        ):
            self.fused_call = (weakref.ref(input_ids), labels)
        elif self.fused_call is not None and (
            labels is not None or input_ids is not self.fused_call[0]()
        ):
            self.fused_call = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _EvaluationForward:
        copied = memo.get(id(self.model_ref()))
        clone = object.__new__(_EvaluationForward)
        clone.__dict__.update(self.__dict__)
        clone.copies = []
        clone.fused_call = None
        if isinstance(copied, nn.Module):
            clone.model_ref = weakref.ref(copied)
            # A forward the instance had of its own is bound to the original: bind it to the copy.
            clone.own_forward = copy.deepcopy(self.own_forward, memo)
            clone.own_train = copy.deepcopy(self.own_train, memo)
            clone.counter = _EvaluationCounter(copied, clone.own_train)
            memo[id(self.counter)] = clone.counter
            self.copies.append(weakref.ref(copied))
        return clone

    def __reduce__(self) -> Any:
        raise TypeError(
            "A model exposed with `logits_chunk_size` or `metrics` cannot be pickled while "
            "exposed: call the handle's `remove()` first (or expose it with neither)."
        )

    def remove(self) -> None:
        """Give the model (and its deep copies) back their own ``forward`` and ``train``."""
        self.active = False
        model = self.model_ref()
        if model is not None:
            self._restore(model)
        for ref in self.copies:
            copied = ref()
            if copied is not None and isinstance(vars(copied).get("forward"), _EvaluationForward):
                vars(copied)["forward"]._restore(copied)

    def _restore(self, model: nn.Module) -> None:
        self.active = False
        if vars(model).get("forward") is not self:
            warnings.warn(
                f"`{type(model).__name__}.forward` was replaced after mllm_metrics wrapped it "
                "(e.g. by accelerate's mixed precision or TRL's fused head), so the wrapper stays "
                "in place; it now calls the model's own forward.",
                category=MllmMetricsWarning,
                stacklevel=4,
            )
        elif self.had_own_forward:
            model.forward = self.own_forward
        else:
            del model.forward
        if vars(model).get("train") is self.counter:
            if self.had_own_train:
                model.train = self.own_train
            else:
                del model.train


class _RememberFusedCall:
    """Forward pre-hook of the exposed model (it fires whatever forward is installed: TRL
    replaces ``forward`` too): hands each call to the wrapper it belongs to."""

    def __init__(self, wrapper: _EvaluationForward) -> None:
        self.wrapper = wrapper

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        wrapper = vars(module).get("forward")
        if not isinstance(wrapper, _EvaluationForward):
            wrapper = self.wrapper
        wrapper.remember_fused_call(module, kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> _RememberFusedCall:
        return self


def _remove_hook(hook: Any, copies: Sequence[nn.Module]) -> None:
    """Remove a forward pre-hook from the model and from its deep copies (same id)."""
    hook.remove()
    for copied in copies:
        copied._forward_pre_hooks.pop(hook.id, None)
        copied._forward_pre_hooks_with_kwargs.pop(hook.id, None)


class _WarnOfFullLogitsUnderTrl:
    """Forward pre-hook of a model exposed with neither a chunk size nor metrics: under TRL's
    ``SFTTrainer`` (its fused head), say once what the metrics cost and how to avoid it."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.warned or module.training or not kwargs.get(_TRL_FUSED_HEAD):
            return
        self.warned = True
        warnings.warn(
            "TRL's SFTTrainer computes its loss with its fused head, then runs a second forward "
            "per evaluation batch for the logits it hands to `compute_metrics`: the whole "
            "(batch, seq_len, vocab) logits. `expose_processed_labels(model, "
            "logits_chunk_size=256)` makes that second forward apply the output head to the "
            "supervised positions only.",
            category=MllmMetricsWarning,
            stacklevel=2,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> _WarnOfFullLogitsUnderTrl:
        return self


def expose_processed_labels(
    model: nn.Module,
    *,
    logits_chunk_size: int | None = None,
    metrics: StreamingMetrics | None = None,
) -> ProcessedLabelsHandle:
    """Prepare a model for :class:`~mllm_metrics.hf.StreamingMetrics` under ``Trainer``.

    Always, and all undone by the returned handle's ``remove()``:

    1. A LLaVA-style model (one with ``prepare_inputs_labels_for_multimodal``) gets a
       ``processed_labels`` field in every output: the labels its logits align with
       (:func:`mllm_metrics.labels.expose_processed_labels`: forward hooks). Models whose
       labels already line up with the logits are unchanged.
    2. ``model.config.keys_to_ignore_at_inference`` (the list ``Trainer.prediction_step`` drops
       from the outputs when ``evaluate()`` gets no ``ignore_keys``) is extended with
       :data:`IGNORED_OUTPUT_KEYS` (caches and encoder outputs ``Trainer`` cannot pad).
    3. A LLaVA-style model raises a clear error, naming ``remove_unused_columns``, when
       ``input_ids`` hold negative placeholder ids and no image/video tensor reached
       ``forward`` (instead of an ``IndexError`` deep in the embedding).

    With ``logits_chunk_size=N`` or ``metrics=streaming``, evaluation forwards (``model.training``
    False, ``labels`` given) run the shared model side
    (:class:`~mllm_metrics.forward.EvaluationForward`) and return a :class:`ChunkedEvalOutput`
    of ids, processed labels and row NLL (never the logits), which
    :meth:`StreamingMetrics.preprocess_logits` takes:

    - ``logits_chunk_size=N``: the model runs up to its final hidden states and the output head
      is applied to the supervised positions only, N at a time (:mod:`mllm_metrics.chunked`);
      the loss is the mean NLL of the supervised labels (``eval_loss`` as the model computes
      it). A model that cannot be split runs its own forward (a warning says so).
    - ``metrics=streaming``: the forward also hands ``Trainer`` what that
      :class:`StreamingMetrics` needs from the batch: each row's group (its ``group_key``
      column, which this adds to the forward's signature so that ``remove_unused_columns``
      keeps it) and the greedy answers (``generate_max_new_tokens``). Without a chunk size the
      model's own forward computes the logits and its loss, reduced to ids in the forward.

    This replaces ``forward`` (keeping the signature ``Trainer`` inspects, plus the group key)
    and ``train`` (which counts the ``eval()`` calls that start each evaluation) on the
    instance until ``remove()``; training forwards and forwards without labels are the model's
    own, given the batch without the group key. A deep copy gets its own and ``remove()``
    restores it too; pickling the model meanwhile raises: ``remove()`` first. TRL's
    ``SFTTrainer`` (1.x), called before or after this, keeps its fused-head loss; its second,
    label-less call per evaluation batch (the logits it recomputes for ``compute_metrics``) is
    served by this forward from the labels of the first.

    Args:
        model: the model given to ``Trainer`` (its hooks also run when ``Trainer`` wraps it
            in ``DistributedDataParallel``).
        logits_chunk_size: the most positions given to the output head at once in evaluation
            forwards; None keeps the model's own forward and its logits.
        metrics: the :class:`StreamingMetrics` passed to ``Trainer``: its groups and generation
            are computed in the evaluation forward.

    Returns:
        A handle whose ``remove()`` undoes everything (also a context manager), on the model and
        on the deep copies made of it meanwhile. A model pickled meanwhile (without a chunk size
        or metrics) and loaded keeps its hooks and config keys.

    Examples:
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
    model_side = None
    if metrics is not None:
        model_side = metrics._model_side(logits_chunk_size)
    elif logits_chunk_size is not None:
        model_side = EvaluationForward(logits_chunk_size=logits_chunk_size)
    handle = _expose_labels(model)
    handle._set_likely_cause(_TRAINER_PLACEHOLDER_CAUSE)
    if model_side is not None:
        wrapper = _EvaluationForward(model, model_side)
        wrapper.install(model)
        hook = model.register_forward_pre_hook(_RememberFusedCall(wrapper), with_kwargs=True)
        handle._add_undo(lambda copies: (_remove_hook(hook, copies), wrapper.remove()))
    else:
        warning = model.register_forward_pre_hook(_WarnOfFullLogitsUnderTrl(), with_kwargs=True)
        handle._add_undo(lambda copies: _remove_hook(warning, copies))
    config = getattr(model, "config", None)
    if config is not None:
        handle._add_undo(_IgnoredOutputKeys(config).restore)
    return handle
