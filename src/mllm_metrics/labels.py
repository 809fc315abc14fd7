"""Getting the labels a model's logits align with out of its ``forward``.

A LLaVA-style model calls ``prepare_inputs_labels_for_multimodal`` inside ``forward``: image
placeholders become many feature positions labelled -100, rows are compacted, re-padded and
truncated. The logits then align with these *processed* labels, which never leave the model.
This module recovers them, in this order of preference:

1. labels the model returns itself: an output field ``processed_labels``, or LLaVA-NeXT's
   ``dpo_forward=True`` pair ``(logits, labels)``;
2. the labels returned by ``prepare_inputs_labels_for_multimodal`` during that very forward
   (or by ``_merge_input_ids_with_image_features``, Hugging Face's Llava before transformers
   4.45), recorded by a thin wrapper set on the instance (the class and its code are untouched);
3. the batch's own ``labels`` when their (batch, seq_len) equals the logits' (models whose
   processor already expanded the image tokens: ``LlavaForConditionalGeneration``, Qwen2-VL);
4. otherwise a ``ValueError`` naming both shapes.

:func:`aligned_forward` runs one forward and returns the logits with their labels (used by the
Lightning module); :func:`expose_processed_labels` makes every forward of a model carry a
``processed_labels`` output field (used with ``transformers.Trainer``);
:func:`aligned_hidden_states` stops before the output head (for chunked logits). None of them
needs transformers, and the first two work on a model wrapped in ``DistributedDataParallel``.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "PREPARE_METHOD",
    "AlignedForward",
    "ProcessedLabelsHandle",
    "AlignedHiddenStates",
    "aligned_forward",
    "aligned_hidden_states",
    "expose_processed_labels",
    "select_aligned_labels",
]

PREPARE_METHOD = "prepare_inputs_labels_for_multimodal"
# Methods that rewrite labels inside a forward, with the position of the labels in what they
# return: LLaVA and its descendants, and Hugging Face's own Llava before transformers 4.45
# (which expanded the image tokens inside forward and returned no labels).
LABEL_PRODUCING_METHODS = {PREPARE_METHOD: -1, "_merge_input_ids_with_image_features": 2}
PROCESSED_LABELS_FIELD = "processed_labels"

# One stack of open recordings per thread: each forward that records pushes a slot, and the
# wrapped prepare method writes into the innermost one, so nested and concurrent forwards
# never see each other's labels.
_recordings = threading.local()
_install_lock = threading.Lock()
_installed: dict[tuple[nn.Module, str], _LabelRecorder] = {}


class _Slot:
    __slots__ = ("labels", "recorded")

    def __init__(self) -> None:
        self.recorded = False
        self.labels: Tensor | None = None


def _push_slot() -> _Slot:
    slot = _Slot()
    _recordings.__dict__.setdefault("stack", []).append(slot)
    return slot


def _pop_slot(slot: _Slot) -> None:
    _recordings.stack.remove(slot)


@contextmanager
def _recording() -> Iterator[_Slot]:
    slot = _push_slot()
    try:
        yield slot
    finally:
        _pop_slot(slot)


class _LabelRecorder:
    """A pass-through wrapper around one module's label-producing method.

    It is set as an instance attribute (shadowing the class's method) and shared by every user
    of the module through a reference count; the last ``release`` restores the module. If other
    code replaced the attribute on top of it meanwhile, the wrapper cannot be taken out, so it
    goes inert instead (a plain pass-through) and a warning says so.
    """

    def __init__(self, module: nn.Module, method: str) -> None:
        self.module_ref = weakref.ref(module)
        self.method = method
        self.had_own_attribute = method in module.__dict__
        self.previous = module.__dict__.get(method)
        self.users = 0
        original = getattr(module, method)
        labels_position = LABEL_PRODUCING_METHODS[method]

        @functools.wraps(original)
        def recording_prepare(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            stack = getattr(_recordings, "stack", None)
            if self.users and stack and isinstance(result, tuple) and result:
                stack[-1].labels, stack[-1].recorded = result[labels_position], True
            return result

        self.wrapper = recording_prepare
        setattr(module, method, recording_prepare)

    def release(self) -> None:
        self.users -= 1
        module = self.module_ref()
        if self.users or module is None:
            return
        if module.__dict__.get(self.method) is not self.wrapper:
            warnings.warn(
                f"`{type(module).__name__}.{self.method}` was replaced after mllm_metrics "
                "wrapped it, so the wrapper stays in place; it no longer records anything.",
                stacklevel=3,
            )
        elif self.had_own_attribute:
            setattr(module, self.method, self.previous)
        else:
            delattr(module, self.method)
        _installed.pop((module, self.method), None)


def _label_producers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (submodule, method) that rewrites labels; reaches inside DDP, compile and PEFT."""
    return [
        (module, method)
        for module in model.modules()
        for method in LABEL_PRODUCING_METHODS
        if callable(getattr(type(module), method, None))
    ]


def _acquire_recorders(model: nn.Module) -> Callable[[], None]:
    """Wrap every label-producing method of the model; return the undo."""
    recorders = []
    with _install_lock:
        for module, method in _label_producers(model):
            recorder = _installed.get((module, method))
            if recorder is None:
                recorder = _installed[(module, method)] = _LabelRecorder(module, method)
            recorder.users += 1
            recorders.append(recorder)

    def release() -> None:
        with _install_lock:
            for recorder in recorders:
                recorder.release()

    return release


@contextmanager
def _recording_labels(model: nn.Module) -> Iterator[_Slot]:
    release = _acquire_recorders(model)
    try:
        with _recording() as slot:
            yield slot
    finally:
        release()


def _logits_of(outputs: Any) -> Tensor:
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    elif isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    else:
        logits = getattr(outputs, "logits", None)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise ValueError(
            "Expected the model's output to carry logits of shape (batch, seq_len, vocab_size) "
            "(an output field `logits`, or the first element of a tuple); got "
            f"{type(outputs).__name__}"
            + (
                f" whose logits have shape {tuple(logits.shape)}"
                if isinstance(logits, Tensor)
                else ""
            )
            + "."
        )
    return logits


def _labels_returned_by_model(outputs: Any, logits: Tensor) -> Tensor | None:
    if isinstance(outputs, Mapping):
        labels = outputs.get(PROCESSED_LABELS_FIELD)
    else:
        labels = getattr(outputs, PROCESSED_LABELS_FIELD, None)
    if labels is None and isinstance(outputs, (tuple, list)) and len(outputs) == 2:
        # LLaVA-NeXT's `dpo_forward=True` returns the pair (logits, labels).
        candidate = outputs[1]
        if isinstance(candidate, Tensor) and candidate.shape == logits.shape[:2]:
            labels = candidate
    return labels


def select_aligned_labels(
    outputs: Any, batch_labels: Tensor | None, recorded_labels: Tensor | None = None
) -> Tensor | None:
    """Pick the labels the logits of ``outputs`` align with, in the module's order of preference.

    Args:
        outputs: what the model's forward returned.
        batch_labels: the labels of the batch as the data set gave them, or None.
        recorded_labels: labels recorded from ``prepare_inputs_labels_for_multimodal``.

    Returns:
        Labels of shape (batch, seq_len) equal to the logits' first two dims, or None when there
        are no labels at all.

    Raises:
        ValueError: if only the batch's labels are known and they do not line up with the logits.

    """
    logits = _logits_of(outputs)
    for labels in (_labels_returned_by_model(outputs, logits), recorded_labels):
        if labels is not None:
            return labels
    if batch_labels is None or batch_labels.shape == logits.shape[:2]:
        return batch_labels
    raise ValueError(
        f"The model returned logits of shape {tuple(logits.shape)}, but the batch's labels have "
        f"shape {tuple(batch_labels.shape)}, and the model gave no labels that line up with its "
        f"logits: it has no output field `{PROCESSED_LABELS_FIELD}` and no `{PREPARE_METHOD}` "
        "method was called during its forward. A model that rewrites its labels inside `forward` "
        f"must expose them: return them as `outputs.{PROCESSED_LABELS_FIELD}` (shape "
        f"{tuple(logits.shape[:2])}), or compute them in a method named `{PREPARE_METHOD}` that "
        "returns them as the last element of its tuple, as LLaVA does."
    )


@dataclass
class AlignedForward:
    """One forward's result with the labels its logits align with.

    Attributes:
        outputs: what the model's forward returned, unchanged.
        logits: the logits, shape (batch, seq_len', vocab_size).
        labels: labels of shape (batch, seq_len') aligned with ``logits``, or None.
        loss: the model's own loss, if it computed one.

    """

    outputs: Any
    logits: Tensor
    labels: Tensor | None
    loss: Tensor | None


def aligned_forward(model: nn.Module, batch: Mapping[str, Any]) -> AlignedForward:
    """Call ``model(**batch)`` and return its logits with the labels they align with.

    The labels of a LLaVA-style model are recorded from ``prepare_inputs_labels_for_multimodal``
    during this call only; the model is restored afterwards. ``batch["labels"]`` is passed to
    the model as it is (the model needs it to compute its loss and its processed labels).

    Args:
        model: any module returning a ``ModelOutput``/dict with ``logits``, or a tuple whose
            first element is the logits; may be wrapped in ``DistributedDataParallel``.
        batch: the keyword arguments of the forward.

    Returns:
        The outputs, logits, aligned labels and loss.

    Example:
        >>> import torch
        >>> class Expanding(torch.nn.Module):  # one image placeholder becomes 3 positions
        ...     def prepare_inputs_labels_for_multimodal(self, input_ids, labels):
        ...         pad = torch.full((labels.shape[0], 2), -100)
        ...         return input_ids, torch.cat([pad, labels], dim=1)
        ...     def forward(self, input_ids, labels):
        ...         _, labels = self.prepare_inputs_labels_for_multimodal(input_ids, labels)
        ...         return {"logits": torch.zeros(*labels.shape, 5)}
        >>> batch = {"input_ids": None, "labels": torch.tensor([[1, 2]])}
        >>> result = aligned_forward(Expanding(), batch)
        >>> result.logits.shape, result.labels
        (torch.Size([1, 4, 5]), tensor([[-100, -100,    1,    2]]))

    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"Expected the batch to be a dict of the model's keyword arguments (input_ids, "
            f"labels, images...), got {type(batch).__name__}. Likely cause: a collate function "
            "that returns a tuple; return a dict instead."
        )
    with _recording_labels(model) as slot:
        outputs = model(**batch)
    recorded = slot.labels if slot.recorded else None
    labels = select_aligned_labels(outputs, batch.get("labels"), recorded)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    return AlignedForward(outputs=outputs, logits=_logits_of(outputs), labels=labels, loss=loss)


class ProcessedLabelsHandle:
    """Undoes :func:`expose_processed_labels`; also a context manager."""

    def __init__(self, hooks: list[RemovableHandle], release: Callable[[], None]) -> None:
        self._hooks = hooks
        self._release: Callable[[], None] | None = release

    def remove(self) -> None:
        """Remove the hooks and restore the wrapped methods (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        if self._release is not None:
            self._release()
            self._release = None

    def __enter__(self) -> ProcessedLabelsHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def expose_processed_labels(model: nn.Module) -> ProcessedLabelsHandle:
    """Make every forward of a LLaVA-style model return its processed labels.

    After this call, an output that is a ``ModelOutput`` or dict gains the field
    ``processed_labels`` (the labels returned by ``prepare_inputs_labels_for_multimodal`` in that
    forward) whenever the model computed some. Forward hooks do the work, so ``forward`` itself,
    its signature and the model's class are untouched, and code that replaces ``forward`` later
    (accelerate's mixed precision) does not get in the way. A model without
    ``prepare_inputs_labels_for_multimodal`` is left as it is.

    Args:
        model: the model, or a wrapper of it (``DistributedDataParallel``, PEFT...).

    Returns:
        A handle whose ``remove()`` undoes everything.

    Example:
        >>> import torch
        >>> class Expanding(torch.nn.Module):
        ...     def prepare_inputs_labels_for_multimodal(self, labels):
        ...         return (torch.cat([torch.full((labels.shape[0], 2), -100), labels], dim=1),)
        ...     def forward(self, labels):
        ...         (labels,) = self.prepare_inputs_labels_for_multimodal(labels)
        ...         return {"logits": torch.zeros(*labels.shape, 5)}
        >>> model = Expanding()
        >>> with expose_processed_labels(model):
        ...     model(torch.tensor([[7]]))["processed_labels"]
        tensor([[-100, -100,    7]])
        >>> "processed_labels" in model(torch.tensor([[7]]))
        False

    """
    release = _acquire_recorders(model)
    if not _label_producers(model):
        return ProcessedLabelsHandle([], release)

    def push_slot(module: nn.Module, args: Any) -> None:
        _push_slot()

    def attach_labels(module: nn.Module, args: Any, outputs: Any) -> Any:
        # Pre- and post-hooks of one thread nest, so the innermost slot is this forward's.
        slot = _recordings.stack[-1]
        _pop_slot(slot)
        if slot.recorded and slot.labels is not None and isinstance(outputs, Mapping):
            outputs[PROCESSED_LABELS_FIELD] = slot.labels
        return outputs

    hooks = [
        model.register_forward_pre_hook(push_slot),
        model.register_forward_hook(attach_labels, always_call=True),
    ]
    return ProcessedLabelsHandle(hooks, release)


@dataclass
class AlignedHiddenStates:
    """The final hidden states of a causal LM, its output head, and the labels they align with.

    ``output_head(hidden_states)`` are the logits the full forward would return.
    """

    hidden_states: Tensor
    output_head: nn.Module
    labels: Tensor | None


# Logit transforms applied after the output head, which a split forward would miss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _call_with_accepted(function: Callable[..., Any], arguments: Mapping[str, Any]) -> Any:
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return function(**arguments)
    return function(**{k: v for k, v in arguments.items() if k in parameters})


def _arguments_for(function: Callable[..., Any], batch: Mapping[str, Any]) -> dict[str, Any]:
    """Every named parameter of ``function``: from the batch, else its default, else None."""
    return {
        name: batch.get(name, None if parameter.default is parameter.empty else parameter.default)
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }


def aligned_hidden_states(model: nn.Module, batch: Mapping[str, Any]) -> AlignedHiddenStates | None:
    """Run a causal LM up to its final hidden states, without applying the output head.

    With the head left out, the caller can apply it to a few positions at a time and never hold
    the (batch, seq_len, vocab_size) logits. Supported: Hugging Face causal LMs whose logits are
    ``get_output_embeddings()(base_model(...)[0])`` (Llama, Mistral, Qwen2, Llava in
    transformers 5...), and LLaVA-style models, whose ``prepare_inputs_labels_for_multimodal`` is
    called here, then their ``base_model`` on the resulting embeddings.

    Args:
        model: the model (not wrapped in DDP).
        batch: the keyword arguments of its forward, ``labels`` included.

    Returns:
        The hidden states (batch, seq_len', hidden), the output head and the aligned labels, or
        None when the model cannot be split this way (the caller then runs the full forward).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if (
        not isinstance(head, nn.Linear)
        or not isinstance(backbone, nn.Module)
        or backbone is model
        or any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
        or callable(getattr(type(model), "_merge_input_ids_with_image_features", None))
    ):
        return None
    labels = batch.get("labels")
    arguments = {k: v for k, v in batch.items() if k != "labels"}
    prepare = getattr(model, PREPARE_METHOD, None)
    if callable(prepare):
        result = prepare(**_arguments_for(prepare, batch))
        if not (isinstance(result, tuple) and len(result) == 6):
            return None
        input_ids, position_ids, attention_mask, _, inputs_embeds, labels = result
        arguments = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
    hidden_states = _call_with_accepted(backbone.forward, arguments)[0]
    if not isinstance(hidden_states, Tensor) or hidden_states.shape[-1] != head.in_features:
        return None
    if labels is not None and labels.shape != hidden_states.shape[:2]:
        return None
    return AlignedHiddenStates(hidden_states=hidden_states, output_head=head, labels=labels)
