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

The wrapper of step 2 exists only while a forward runs: between forwards an exposed model has
no instance attribute of ours, only two forward hooks, which are picklable objects. So an
exposed model can be deep-copied (the copy records its own labels) and pickled or saved with
``torch.save``, and its ``state_dict`` is unchanged. For models with
``prepare_inputs_labels_for_multimodal``, all three functions also turn the classic data bug
(``input_ids`` with image placeholders but no image tensor in the batch) into a clear
``ValueError`` instead of an ``IndexError`` inside the embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mllm_metrics._warning import MllmMetricsWarning

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
# The processed labels of the latest exposed forward, per thread (see _remember_processed_labels).
_latest = threading.local()


class _Slot:
    __slots__ = ("labels", "owner", "recorded", "release")

    def __init__(self, owner: tuple[object, nn.Module] | None = None) -> None:
        self.recorded = False
        self.labels: Tensor | None = None
        # (exposure, module) for a slot opened by an exposure's pre-hook, None otherwise.
        self.owner = owner
        self.release: Callable[[], None] | None = None


def _push_slot(owner: tuple[object, nn.Module] | None = None) -> _Slot:
    slot = _Slot(owner)
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

    It is set as an instance attribute (shadowing the class's method) for the duration of a
    forward only, and shared by every forward running at that time through a reference count;
    the last ``release`` restores the module. If other code replaced the attribute on top of it
    meanwhile, the wrapper cannot be taken out, so it goes inert instead (a plain pass-through)
    and a warning says so.
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
                category=MllmMetricsWarning,
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


# The value `Trainer` pads outputs with across processes (`pad_across_processes`).
_TRAINER_PADDING = -100


def _remember_processed_labels(labels: Tensor) -> None:
    """Remember ``labels`` as this thread's latest processed labels, replacing the previous ones.

    The exposure's post-hook calls it for every forward whose output carries
    ``processed_labels``. ``Trainer`` hands the outputs on as a tuple of detached tensors, whose
    field names (and Python attributes) are lost; :func:`_is_processed_labels` then recognises
    the processed labels among them by identity. One strong reference per thread (one batch of
    integer labels) is kept.
    """
    _latest.labels = labels


def _is_processed_labels(value: object) -> bool:
    """Whether ``value`` is (a view of) this thread's latest remembered processed labels.

    True iff ``value`` is a tensor of the dtype and device of the labels last passed to
    :func:`_remember_processed_labels` on this thread, and shares their memory (a
    ``.detach()``-ed view) or equals them value for value, possibly followed by columns of -100
    (the copy ``DistributedDataParallel`` makes of every output, padded by ``Trainer`` to the
    longest sequence of all processes). An integer field with other values is never taken for
    them; one equal to them gives the same numbers.
    """
    labels = getattr(_latest, "labels", None)
    if not isinstance(value, Tensor) or labels is None:
        return False
    if value is labels:
        return True
    if (
        value.ndim != 2
        or value.dtype != labels.dtype
        or value.device != labels.device
        or value.shape[0] != labels.shape[0]
        or value.shape[1] < labels.shape[1]
    ):
        return False
    width = labels.shape[1]
    if value.shape[1] == width and value.data_ptr() == labels.data_ptr():
        return True
    # Under DDP, `Trainer` pads every output to the longest sequence of all processes (with
    # -100, at the end) before `preprocess_logits_for_metrics`, and DistributedDataParallel with
    # `find_unused_parameters` clones every output: equal values then stand for the labels.
    return torch.equal(value[:, :width], labels) and bool(
        value[:, width:].eq(_TRAINER_PADDING).all()
    )


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

_MISSING_MODALITY_CAUSE = (
    "Likely cause: the collate function or the data set dropped the images (or put them under a "
    "key that is not an argument of `forward`, e.g. `image` for `images`). Make every batch "
    "carry the image/video tensor under the name of the argument `forward` takes."
)


def _is_modality(value: Any) -> bool:
    """A floating-point tensor (pixels, features, audio), raw uint8 pixels, or a list of them."""
    if isinstance(value, Tensor):
        return value.is_floating_point() or (value.dtype == torch.uint8 and value.ndim >= 3)
    if isinstance(value, (list, tuple)) and value:
        return _is_modality(value[0])
    return False


def _check_placeholders_have_modality(
    model: nn.Module,
    kwargs: Mapping[str, Any],
    args: Sequence[Any] = (),
    *,
    likely_cause: str | None = None,
) -> None:
    """Raise a clear error when ``input_ids`` hold image placeholders but no image reached forward.

    A LLaVA-style ``forward`` called without its images leaves the negative placeholder ids
    (-200...) in ``input_ids`` and fails with an ``IndexError`` deep inside the embedding. This
    is checked only for models with a ``prepare_inputs_labels_for_multimodal`` method, and costs
    a host-device sync only for batches without any image/video tensor.

    Args:
        model: the model about to be called (may be wrapped in ``DistributedDataParallel``).
        kwargs: the keyword arguments of its forward.
        args: its positional arguments (``input_ids`` may be the first).
        likely_cause: the end of the message; by default it blames the collate function or the
            data set.

    Raises:
        ValueError: naming the placeholder id, the arguments received and those ``forward``
            takes, and the likely cause.

    """
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if (
        not isinstance(input_ids, Tensor)
        or input_ids.is_floating_point()
        or input_ids.is_complex()
        or kwargs.get("inputs_embeds") is not None
        or any(_is_modality(value) for value in args[1:])
        or any(
            _is_modality(value)
            for name, value in kwargs.items()
            if name not in _TEXT_ARGUMENTS and value is not None
        )
    ):
        return
    owner = next((m for m, method in _label_producers(model) if method == PREPARE_METHOD), None)
    if owner is None:
        return
    negative = input_ids < 0
    if not bool(negative.any()):  # a host sync, only on batches without a modality tensor
        return
    received = sorted(name for name, value in kwargs.items() if value is not None)
    takes = list(inspect.signature(owner.forward).parameters)
    raise ValueError(
        f"`input_ids` hold the negative id {int(input_ids[negative][0])} (an image/video "
        "placeholder), but no image/video tensor reached "
        f"`{type(owner).__name__}.forward`: it received {received}, and it takes {takes}. "
        + (likely_cause or _MISSING_MODALITY_CAUSE)
    )


def batch_rows(batch: Mapping[str, Any]) -> int | None:
    """The number of rows of a dict batch (of its ``labels`` or ``input_ids``), or None."""
    for key in ("labels", "input_ids"):
        value = batch.get(key)
        if isinstance(value, Tensor):
            return value.shape[0]
    return None


def _check_every_row_kept(model: nn.Module, batch: Mapping[str, Any], rows: int) -> None:
    """Raise when the model's output has fewer (or more) rows than the batch: a row the model
    dropped would silently count in no metric."""
    given = batch_rows(batch)
    if given is None or given == rows:
        return
    method = getattr(model, PREPARE_METHOD, model.forward)
    likely = (
        " Likely cause: LLaVA-NeXT's `modalities` argument defaults to ['image'], a list of one, "
        "and its prepare method keeps one row per entry: give the batch `modalities` with one "
        "entry per row."
        if "modalities" in inspect.signature(method).parameters and "modalities" not in batch
        else ""
    )
    raise ValueError(
        f"The batch has {given} rows but {type(model).__name__}'s output has {rows}: the rows "
        f"it left out would count in no metric.{likely}"
    )


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


def aligned_forward(
    model: nn.Module, batch: Mapping[str, Any], call: Callable[..., Any] | None = None
) -> AlignedForward:
    """Call ``model(**batch)`` and return its logits with the labels they align with.

    The labels of a LLaVA-style model are recorded from ``prepare_inputs_labels_for_multimodal``
    during this call only; the model is restored afterwards. ``batch["labels"]`` is passed to
    the model as it is (the model needs it to compute its loss and its processed labels).

    Args:
        model: any module returning a ``ModelOutput``/dict with ``logits``, or a tuple whose
            first element is the logits; may be wrapped in ``DistributedDataParallel``.
        batch: the keyword arguments of the forward.
        call: what runs the forward, ``model`` by default (a forward method of the model's,
            from inside a wrapper set as its ``forward``).

    Returns:
        The outputs, logits, aligned labels and loss.

    Raises:
        ValueError: if the logits cannot be found or aligned with labels, or if a model with
            ``prepare_inputs_labels_for_multimodal`` gets ``input_ids`` with image placeholders
            but no image/video tensor (the collate function dropped it).

    Examples:
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
    _check_placeholders_have_modality(model, batch)
    with _recording_labels(model) as slot:
        outputs = (model if call is None else call)(**batch)
    recorded = slot.labels if slot.recorded else None
    _check_every_row_kept(model, batch, _logits_of(outputs).shape[0])
    labels = select_aligned_labels(outputs, batch.get("labels"), recorded)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    return AlignedForward(outputs=outputs, logits=_logits_of(outputs), labels=labels, loss=loss)


# The per-module dicts a forward hook's id is stored in.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class _Exposure:
    """What one :func:`expose_processed_labels` call installed, shared by its two hooks.

    It knows the hooked module, the ids of the hooks, and the deep copies of the module made
    while the hooks were on it (they carry the same hooks under the same ids), so that
    :meth:`remove` takes the hooks off all of them. Pickled, it becomes a stand-alone exposure
    that tracks nothing: a model loaded from a pickle keeps hooks that record its own labels.
    """

    def __init__(self, module: nn.Module | None, likely_cause: str | None = None) -> None:
        self.module_ref = weakref.ref(module) if module is not None else None
        self.copies: list[weakref.ref[nn.Module]] = []
        self.hook_ids: tuple[int, ...] = ()
        self.likely_cause = likely_cause
        self.active = True

    def modules(self) -> list[nn.Module]:
        """The hooked module (first) and its tracked deep copies that are still alive."""
        refs = ([self.module_ref] if self.module_ref is not None else []) + self.copies
        return [module for module in (ref() for ref in refs) if module is not None]

    def copies_alive(self) -> list[nn.Module]:
        """The tracked deep copies of the hooked module that are still alive."""
        return [module for module in (ref() for ref in self.copies) if module is not None]

    def track_copy(self, memo: dict[int, Any]) -> None:
        """Called while ``copy.deepcopy`` copies one of our hooks: find the module it copies."""
        if not self.active:
            return
        with _install_lock:
            self.copies = [ref for ref in self.copies if ref() is not None]
            modules = self.modules()
            for module in modules:
                copied = memo.get(id(module))
                if isinstance(copied, nn.Module) and copied is not module:
                    if all(copied is not other for other in modules):
                        self.copies.append(weakref.ref(copied))
                    return

    def remove(self) -> None:
        """Take the hooks off the hooked module and off every tracked copy (idempotent)."""
        with _install_lock:
            modules, self.active, self.copies = self.modules(), False, []
        for module in modules:
            for name in _HOOK_DICTS:
                hooks = getattr(module, name, None)
                if isinstance(hooks, dict):
                    for hook_id in self.hook_ids:
                        hooks.pop(hook_id, None)

    def __getstate__(self) -> dict[str, Any]:
        return {"hook_ids": self.hook_ids, "likely_cause": self.likely_cause}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None, state["likely_cause"])
        self.hook_ids = state["hook_ids"]


class _ExposureHook:
    """Base of the exposure's forward hooks: module-level classes, so a hooked model pickles.

    ``copy.deepcopy`` keeps the very hook object (it acts on the module it is called with, so
    it serves the copy as well as the original) and registers the copy with the exposure.
    """

    def __init__(self, exposure: _Exposure) -> None:
        self.exposure = exposure

    def __deepcopy__(self, memo: dict[int, Any]) -> _ExposureHook:
        self.exposure.track_copy(memo)
        return self


class _BeginForward(_ExposureHook):
    """Forward pre-hook: check the placeholders, open a recording, install the wrappers."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.exposure.active:  # left on a module the exposure does not know of
            return
        _check_placeholders_have_modality(
            module, kwargs, args, likely_cause=self.exposure.likely_cause
        )
        slot = _push_slot(owner=(self.exposure, module))
        try:
            slot.release = _acquire_recorders(module)
        except BaseException:
            _pop_slot(slot)
            raise


class _EndForward(_ExposureHook):
    """Forward hook (always called): release the wrappers, attach and remember the labels."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], outputs: Any) -> Any:
        stack = getattr(_recordings, "stack", None) or []
        # This forward's slot: the innermost one this exposure opened for this module. It is
        # missing when a pre-hook before ours raised; it need not be on top when several
        # exposures hook the same module (their post-hooks do not run in reverse order).
        slot = next(
            (
                slot
                for slot in reversed(stack)
                if slot.owner is not None
                and slot.owner[0] is self.exposure
                and slot.owner[1] is module
            ),
            None,
        )
        if slot is None:
            return outputs
        _pop_slot(slot)
        if slot.release is not None:
            slot.release()
        if getattr(type(outputs), "holds_processed_labels", False):
            return outputs  # they travel inside it (mllm_metrics.hf.ChunkedEvalOutput)
        if isinstance(outputs, Mapping):
            labels = outputs.get(PROCESSED_LABELS_FIELD)
            if labels is None and slot.recorded and slot.labels is not None:
                labels = slot.labels
                outputs = _with_processed_labels(outputs, labels)
        else:
            labels = getattr(outputs, PROCESSED_LABELS_FIELD, None)
        if isinstance(labels, Tensor):
            _remember_processed_labels(labels)
        return outputs


_OUTPUT_CLASSES: dict[type, type] = {}


def _with_processed_labels(outputs: Any, labels: Tensor) -> Any:
    """``outputs`` with a ``processed_labels`` field.

    A dict gains the key. A ``ModelOutput`` (a dataclass) becomes an instance of a subclass of
    its class that has the field: code that rebuilds an output from its items (PyTorch's
    pytree, which ``DistributedDataParallel(find_unused_parameters=True)`` uses on every
    training forward) calls the class with every key, and the class must take them all.
    """
    fields = getattr(type(outputs), "__dataclass_fields__", None)
    if fields is None or PROCESSED_LABELS_FIELD in fields:
        outputs[PROCESSED_LABELS_FIELD] = labels
        return outputs
    base = type(outputs)
    with _install_lock:
        extended = _OUTPUT_CLASSES.get(base)
        if extended is None:
            extended = dataclasses.make_dataclass(
                f"{base.__name__}WithProcessedLabels",
                [(PROCESSED_LABELS_FIELD, Any, dataclasses.field(default=None))],
                bases=(base,),
                namespace={"__module__": __name__, "__reduce__": _reduce_output},
            )
            _OUTPUT_CLASSES[base] = extended
    return extended(**dict(outputs.items()), **{PROCESSED_LABELS_FIELD: labels})


def _reduce_output(outputs: Any) -> tuple[Any, ...]:
    """Pickle an extended output as its base class's, rebuilt with the field on loading."""
    items = dict(outputs.items())
    labels = items.pop(PROCESSED_LABELS_FIELD, None)
    return _rebuild_output, (type(outputs).__mro__[1], items, labels)


def _rebuild_output(base: type, items: dict[str, Any], labels: Tensor | None) -> Any:
    outputs = base(**items)
    return outputs if labels is None else _with_processed_labels(outputs, labels)


class ProcessedLabelsHandle:
    """Undoes :func:`expose_processed_labels`; also a context manager."""

    def __init__(self, exposure: _Exposure) -> None:
        self._exposure: _Exposure | None = exposure
        self._on_remove: list[Callable[[list[nn.Module]], None]] = []

    def remove(self) -> None:
        """Remove the hooks from the model and from its deep copies (idempotent)."""
        if self._exposure is None:
            return
        exposure, self._exposure = self._exposure, None
        copies = exposure.copies_alive()
        exposure.remove()
        for undo in self._on_remove:
            undo(copies)

    def _add_undo(self, undo: Callable[[list[nn.Module]], None]) -> None:
        """Also run ``undo(copies)`` on ``remove()``, with the deep copies tracked until then."""
        self._on_remove.append(undo)

    def _set_likely_cause(self, likely_cause: str) -> None:
        """The likely cause the placeholder error names (the default blames the collate)."""
        if self._exposure is not None:
            self._exposure.likely_cause = likely_cause

    def __enter__(self) -> ProcessedLabelsHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def expose_processed_labels(model: nn.Module) -> ProcessedLabelsHandle:
    """Make every forward of a LLaVA-style model return its processed labels.

    After this call, an output that is a ``ModelOutput`` or dict gains the field
    ``processed_labels`` (the labels returned by ``prepare_inputs_labels_for_multimodal`` in that
    forward) whenever the model computed some and did not return such a field itself. Forward
    hooks do the work, so ``forward`` itself, its signature and the model's class are untouched,
    and code that replaces ``forward`` later (accelerate's mixed precision) does not get in the
    way. The prepare method is wrapped only while a forward runs; between forwards the model
    carries nothing but the two hooks.

    The hooks also remember, per thread, the ``processed_labels`` of the latest forward (ours or
    the model's own), so that they can be recognised once ``Trainer`` has turned the outputs into
    a tuple; and a model with ``prepare_inputs_labels_for_multimodal`` that gets ``input_ids``
    with image placeholders but no image/video tensor raises a clear ``ValueError``. A model
    whose outputs carry no labels is otherwise left as it is.

    The exposed model can be deep-copied: the copy carries the same hooks, records its own
    labels, and ``remove()`` takes the hooks off it too. It can be pickled (``torch.save``): a
    model loaded from the pickle keeps hooks that record its own labels, which no handle
    removes (and loading it needs ``mllm_metrics``). ``state_dict`` is unaffected.

    Args:
        model: the model, or a wrapper of it (``DistributedDataParallel``, PEFT...).

    Returns:
        A handle whose ``remove()`` undoes everything.

    Examples:
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
    exposure = _Exposure(model)
    begin = model.register_forward_pre_hook(_BeginForward(exposure), with_kwargs=True)
    end = model.register_forward_hook(_EndForward(exposure), always_call=True)
    exposure.hook_ids = (begin.id, end.id)
    return ProcessedLabelsHandle(exposure)


@dataclass
class AlignedHiddenStates:
    """The final hidden states of a causal LM, its output head, and the labels they align with.

    ``logits(hidden_states)`` are the logits the full forward would return: the output head,
    then the model's own transform of them (``logit_transform``, e.g. Gemma's soft cap).
    """

    hidden_states: Tensor
    output_head: nn.Module
    labels: Tensor | None
    logit_transform: Callable[[Tensor], Tensor] | None = None

    def logits(self, hidden_states: Tensor) -> Tensor:
        """The model's logits at ``hidden_states``."""
        logits = self.output_head(hidden_states)
        return logits if self.logit_transform is None else self.logit_transform(logits)


# Logit soft caps, the one transform after the output head that every model spells the same
# way: logits = tanh(logits / cap) * cap (Gemma 2-4, PaliGemma, RecurrentGemma, ...), read on
# the model's config and on its text config (Gemma 4 keeps it there).
_SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap")
# Other transforms of the logits (or of the last hidden states) that models apply around the
# head, each its own way (Cohere multiplies by `logit_scale`, Granite divides by
# `logits_scaling`, HyperCLOVAX multiplies by it, MiniCPM3 divides the hidden states...): a
# model with one of these set is not split (its own forward runs, with a warning).
_OTHER_TRANSFORMS = (
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
    "output_multiplier_scale",
    "logits_mup_width_multiplier",
)


class _SoftCap:
    """``tanh(logits / cap) * cap``, as the models compute it after their head (in the head's
    dtype; their loss upcasts the result to float32)."""

    def __init__(self, cap: float) -> None:
        self.cap = float(cap)

    def __call__(self, logits: Tensor) -> Tensor:
        return torch.tanh(logits / self.cap) * self.cap


_NOT_SPLIT = object()


def _logit_transform(model: nn.Module) -> Any:
    """What the model applies to its head's logits: None, a :class:`_SoftCap`, or
    ``_NOT_SPLIT`` when it applies a transform the split does not reproduce exactly."""
    config = getattr(model, "config", None)
    configs = [config]
    text_config = getattr(config, "get_text_config", None)
    if callable(text_config):
        configs.append(text_config())
    transform = None
    for holder in configs:
        if holder is None:
            continue
        for name in _OTHER_TRANSFORMS:
            if getattr(holder, name, None) not in (None, 1, 1.0):
                return _NOT_SPLIT
        for name in _SOFT_CAPS:
            cap = getattr(holder, name, None)
            if cap is not None:
                transform = _SoftCap(cap)
    return transform


def _call_with_accepted(module: nn.Module, arguments: Mapping[str, Any]) -> Any:
    """Call ``module`` (so its hooks run: FSDP unsharding, user hooks) with the arguments its
    ``forward`` accepts."""
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return module(**arguments)
    return module(**{k: v for k, v in arguments.items() if k in parameters})


def _arguments_for(function: Callable[..., Any], batch: Mapping[str, Any]) -> dict[str, Any]:
    """Every named parameter of ``function``: from the batch, else its default, else None."""
    return {
        name: batch.get(name, None if parameter.default is parameter.empty else parameter.default)
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }


# The name of the forward method FSDP runs its hooks around, set only while one runs.
_FSDP_SPLIT_METHOD = "_mllm_metrics_split_forward"


def _is_sharded_fsdp_root(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (``fully_shard``) whose own parameters (those that no
    nested FSDP module holds: embeddings, output head...) are sharded now, i.e. outside its
    forward."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # no model is sharded before its import
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is None or not isinstance(model, fsdp_module):
        return False
    from torch.distributed.tensor import DTensor

    modules = [model]
    while modules:
        module = modules.pop()
        if any(isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            return True
        modules += [child for child in module.children() if not isinstance(child, fsdp_module)]
    return False


def _split_as_fsdp_forward(
    model: nn.Module, batch: Mapping[str, Any]
) -> AlignedHiddenStates | None:
    """:func:`aligned_hidden_states` of an FSDP2 root called outside its forward.

    The backbone and head called directly would meet the root's sharded parameters (DTensors),
    and a decoder layer called before the root ever ran forward would make itself FSDP's root.
    So the split runs as one forward of the root (``register_fsdp_forward_method``): FSDP
    initialises, gathers the root's parameters, and each layer gathers its own through its
    hooks. The gathered head is copied into the result (a head that is an FSDP module of its
    own stays as it is: its hooks gather it at each call), then the root is sharded again.
    """
    from torch.distributed.tensor import DTensor

    def split(batch: dict[str, Any]) -> AlignedHiddenStates | None:
        result = _split_forward(model, batch)
        if result is not None and not isinstance(result.output_head.weight, DTensor):
            result.output_head = _gathered_copy(result.output_head)
        return result

    # The data error before FSDP starts a forward that it would then leave unfinished.
    _check_placeholders_have_modality(model, batch)
    return run_in_root_forward(model, split, dict(batch))


def run_in_root_forward(model: nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, run as one forward of ``model`` when it is an FSDP2 root whose
    parameters are sharded now (``register_fsdp_forward_method``: FSDP gathers the root's
    parameters for it, then shards them again); otherwise simply called.

    For the work a model does outside its ``forward`` (the split, the prompt embeddings of a
    decoding loop), which would otherwise meet the root's DTensor parameters."""
    if not _is_sharded_fsdp_root(model):
        return function(*args)
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, _FSDP_SPLIT_METHOD, function)
    try:
        register_fsdp_forward_method(model, _FSDP_SPLIT_METHOD)
        return getattr(model, _FSDP_SPLIT_METHOD)(*args)
    finally:
        delattr(model, _FSDP_SPLIT_METHOD)
        model.reshard()


def _gathered_copy(head: nn.Module) -> nn.Linear:
    """A detached copy of a Linear head whose weights FSDP gathered, in memory of its own."""
    copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    copy.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if head.bias is not None:
        copy.bias = nn.Parameter(head.bias.detach().clone(), requires_grad=False)
    return copy


def aligned_hidden_states(model: nn.Module, batch: Mapping[str, Any]) -> AlignedHiddenStates | None:
    """Run a causal LM up to its final hidden states, without applying the output head.

    With the head left out, the caller can apply it to a few positions at a time and never hold
    the (batch, seq_len, vocab_size) logits. Supported: Hugging Face causal LMs whose logits are
    ``get_output_embeddings()(base_model(...)[0])`` (Llama, Mistral, Qwen2, Llava in
    transformers 5...), and LLaVA-style models, whose ``prepare_inputs_labels_for_multimodal`` is
    called here, then their ``base_model`` on the resulting embeddings.

    A model sharded with PyTorch FSDP2 (``fully_shard``) is run as one forward of its root, so
    that FSDP gathers the parameters and shards them again; the returned head is then a
    gathered copy of the model's, which lives as long as the result.

    Args:
        model: the model (not wrapped in DDP).
        batch: the keyword arguments of its forward, ``labels`` included.

    Returns:
        The hidden states (batch, seq_len', hidden), the output head and the aligned labels, or
        None when the model cannot be split this way (the caller then runs the full forward).

    Raises:
        ValueError: if a LLaVA-style model gets ``input_ids`` with image placeholders but no
            image/video tensor (the collate function dropped it).
    """
    if _is_sharded_fsdp_root(model):
        return _split_as_fsdp_forward(model, batch)
    return _split_forward(model, batch)


def _split_forward(model: nn.Module, batch: Mapping[str, Any]) -> AlignedHiddenStates | None:
    """:func:`aligned_hidden_states` of a model whose parameters are all usable as they are."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    transform = _logit_transform(model)
    if (
        not isinstance(head, nn.Linear)
        or not isinstance(backbone, nn.Module)
        or backbone is model
        or transform is _NOT_SPLIT
        or callable(getattr(type(model), "_merge_input_ids_with_image_features", None))
    ):
        return None
    labels = batch.get("labels")
    arguments = {k: v for k, v in batch.items() if k != "labels"}
    prepare = getattr(model, PREPARE_METHOD, None)
    if callable(prepare):
        _check_placeholders_have_modality(model, batch)
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
    hidden_states = _call_with_accepted(backbone, arguments)[0]
    if not isinstance(hidden_states, Tensor) or hidden_states.shape[-1] != head.in_features:
        return None
    _check_every_row_kept(model, batch, hidden_states.shape[0])
    if labels is not None and labels.shape != hidden_states.shape[:2]:
        return None
    return AlignedHiddenStates(
        hidden_states=hidden_states, output_head=head, labels=labels, logit_transform=transform
    )
