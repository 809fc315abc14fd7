"""Pure functions behind the metrics: the causal shift, the counting rules and their checks.

Each rule has one implementation here. The ``_*_update`` functions return the integer sufficient
statistics of one batch (a numerator and a denominator) and never sync with the host; the
``Metric`` classes in :mod:`mllm_metrics.metrics` add them to their states, and
:func:`_ratio` turns the sums into the final value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "bit_match_accuracy",
    "causal_shift",
    "exact_match_accuracy",
    "text_bit_match_accuracy",
    "text_exact_match",
]

_PROCESSED_LABELS_HINT = (
    "Logits longer than the labels usually mean the model rewrote its labels inside `forward` "
    "(a LLaVA-style `prepare_inputs_labels_for_multimodal` expands each image placeholder into "
    "many feature positions and may pad or truncate rows): compare the logits with the "
    "*processed* labels, which `mllm_metrics.labels` recovers from the model's forward."
)


def _is_signed_integer(tensor: Tensor) -> bool:
    """The one dtype rule for token ids and labels: signed integers of any width.

    ``bool`` and unsigned types are excluded: a ``uint8`` label of -100 wraps to 156, so a real
    label 156 would be ignored, and ``bool`` "ids" are almost always a mask passed by mistake.
    """
    return tensor.dtype.is_signed and not tensor.is_floating_point() and not tensor.is_complex()


def _check_labels_dtype(target: Tensor, name: str = "target") -> None:
    """Raise a clear error unless ``target`` holds labels of a signed integer type."""
    if _is_signed_integer(target):
        return
    if target.is_floating_point() or target.is_complex():
        cause = (
            "logits or probabilities passed as the labels; the labels go second: "
            "`update(preds, target)`"
        )
    elif target.dtype == torch.bool:
        cause = "an attention or supervision mask passed instead of the labels"
    else:
        cause = (
            f"labels stored as {target.dtype}, which cannot hold the negative `ignore_index` "
            "(-100 wraps around to a real token id); keep them int64 (or any signed int)"
        )
    raise TypeError(
        f"Expected `{name}` to hold token labels of a signed integer dtype (int64, int32, ...), "
        f"got dtype {target.dtype}. Likely cause: {cause}."
    )


def _check_token_inputs(
    preds: Tensor, target: Tensor, ignore_index: int, validate_args: bool = True
) -> None:
    """Raise a clear error for token inputs the metrics cannot count correctly.

    The shape, rank, dtype and device checks are free. ``validate_args`` adds the value checks
    (a host-device sync): negative labels other than ``ignore_index``, and labels outside the
    vocabulary when logits are given.
    """
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            "Expected `preds` and `target` to be torch.Tensor, got "
            f"{type(preds).__name__} and {type(target).__name__}."
        )
    _check_labels_dtype(target)
    if target.ndim != 2:
        raise ValueError(
            f"Expected `target` of shape (batch, seq_len), got shape {tuple(target.shape)}."
        )
    if preds.ndim == 2:
        if preds.is_floating_point() or preds.is_complex():
            raise TypeError(
                f"Got 2-D floating-point `preds` of shape {tuple(preds.shape)}: expected integer "
                "token ids of shape (batch, seq_len) or floating-point logits of shape "
                "(batch, seq_len, vocab_size). Likely cause: per-token scores or losses were "
                "passed instead of predictions; take `logits.argmax(-1)` or pass the logits."
            )
        if not _is_signed_integer(preds):
            raise TypeError(
                f"Got `preds` of dtype {preds.dtype}: token ids must be of a signed integer "
                "dtype (int64, int32, ...). Likely cause: a mask (bool) or an image (uint8) "
                "passed instead of the predicted ids, e.g. `preds == target` instead of `preds`."
            )
    elif preds.ndim == 3:
        if not preds.is_floating_point():
            raise TypeError(
                f"Got 3-D `preds` of dtype {preds.dtype}: a 3-D input must be floating-point "
                "logits of shape (batch, seq_len, vocab_size); token ids are 2-D."
            )
    else:
        raise ValueError(
            f"Expected `preds` as token ids (batch, seq_len) or logits (batch, seq_len, "
            f"vocab_size), got a {preds.ndim}-D tensor of shape {tuple(preds.shape)}."
        )
    if preds.shape[:2] != target.shape:
        hint = f" {_PROCESSED_LABELS_HINT}" if preds.shape[1] > target.shape[1] else ""
        raise ValueError(
            f"`preds` of shape {tuple(preds.shape)} do not line up with `target` of shape "
            f"{tuple(target.shape)}: their (batch, seq_len) must be equal.{hint}"
        )
    if preds.device != target.device:
        raise ValueError(
            f"`preds` are on {preds.device} but `target` is on {target.device}; move both to "
            "the same device."
        )
    if preds.device.type == "meta":
        raise ValueError(
            "Got `preds` and `target` on the meta device: they hold no values to count. Likely "
            "cause: a model built under `torch.device('meta')` (or with `init_empty_weights`) "
            "whose weights were never loaded."
        )
    if validate_args:
        _check_label_values(target, ignore_index, preds.shape[2] if preds.ndim == 3 else None)


def _check_label_values(target: Tensor, ignore_index: int, vocab_size: int | None) -> None:
    invalid = target.lt(0)
    if vocab_size is not None:
        invalid.logical_or_(target.ge(vocab_size))
    invalid.logical_and_(target.ne(ignore_index))  # `ignore_index` may be any value, even >= V
    if invalid.count_nonzero():  # the one host sync of an update
        value = int(target[invalid][0])
        if value < 0:
            raise ValueError(
                f"`target` holds the negative label {value}, which is not `ignore_index` "
                f"({ignore_index}). Likely cause: an image/video placeholder id (LLaVA uses "
                "-200) left in the labels, i.e. the dataset's labels were used where the "
                "model's processed labels were needed; or `ignore_index` does not match the "
                "value used to mask the labels."
            )
        raise ValueError(
            f"`target` holds the label {value}, outside the logits' vocabulary of size "
            f"{vocab_size}. Likely cause: labels from a different tokenizer than the model's."
        )


def _argmax_ids(preds: Tensor) -> Tensor:
    """Token ids from ids (returned as they are) or logits (argmax over the last dim)."""
    return preds.argmax(dim=-1) if preds.ndim == 3 else preds


def causal_shift(preds_or_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's outputs with its labels: position ``t`` predicts the label at ``t+1``.

    This is the shift Hugging Face's ``ForCausalLMLoss`` applies. Logits are sliced before the
    argmax, so only the (B, L-1) ids are allocated, in the logits' own dtype and device.

    Args:
        preds_or_logits: token ids of shape (B, L) or logits of shape (B, L, V).
        labels: labels of shape (B, L), aligned with the logits (the *processed* labels for a
            model that rewrites them in ``forward``).

    Returns:
        ``(preds, target)``: int token ids of shape (B, L-1) and ``labels[:, 1:]``.

    Examples:
        >>> import torch
        >>> from mllm_metrics.functional import causal_shift
        >>> logits = torch.tensor([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]])
        >>> labels = torch.tensor([[-100, 1, 0]])
        >>> causal_shift(logits, labels)
        (tensor([[1, 0]]), tensor([[1, 0]]))

    """
    _check_token_inputs(preds_or_logits, labels, ignore_index=-100, validate_args=False)
    return _argmax_ids(preds_or_logits[:, :-1]), labels[:, 1:]


def _bit_match_rows(preds: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Each row's supervised positions that match, and its supervised positions: (B,) int64."""
    supervised = target != ignore_index
    correct = (preds == target).logical_and_(supervised).sum(dim=1)
    return correct, supervised.sum(dim=1)


def _bit_match_update(preds: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Count supervised positions that match, and supervised positions (int64, no sync)."""
    correct, supervised = _bit_match_rows(preds, target, ignore_index)
    return correct.sum(), supervised.sum()


def _exact_match_rows(preds: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per row, (B,) int64: 1 when it has a supervised position and all of them match; 1 when
    it has a supervised position (a row without one is not counted)."""
    if target.shape[1] == 0:  # amax needs a non-empty dim; no row has a supervised position
        zeros = target.new_zeros(target.shape[0], dtype=torch.long)
        return zeros, zeros
    supervised = target != ignore_index
    wrong = (preds != target).logical_and_(supervised)
    counted, any_wrong = supervised.amax(dim=1), wrong.amax(dim=1)  # amax: a faster `any`
    return counted.gt(any_wrong).long(), counted.long()  # on bools, a > b is a and not b


def _exact_match_update(preds: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Count rows whose supervised positions all match, and rows with a supervised position."""
    exact, counted = _exact_match_rows(preds, target, ignore_index)
    return exact.sum(), counted.sum()


def _row_nll(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Summed NLL of each row's supervised labels, float64 (B,).

    Each token's NLL in float32 (as ``ForCausalLMLoss`` upcasts), summed in float64 as the
    supervised-only head sums them, so both paths add the same values the same way. One row at
    a time, so at most one ``L x V`` float32 copy of the logits exists at once.
    """
    rows = [
        torch.nn.functional.cross_entropy(
            row_logits.float(), row_target.long(), ignore_index=ignore_index, reduction="none"
        ).sum(dtype=torch.float64)
        for row_logits, row_target in zip(logits, target)
    ]
    return torch.stack(rows) if rows else logits.new_zeros(0, dtype=torch.float64)


#: The label Hugging Face models write where nothing is supervised (image features, padding),
#: and ``Trainer`` pads with: never a token, so ignored whatever ``ignore_index`` is.
HF_IGNORE_INDEX = -100


def _hf_ignored(labels: Tensor, ignore_index: int) -> Tensor:
    """``labels`` with every -100 set to ``ignore_index`` (one ignore value per position)."""
    if ignore_index == HF_IGNORE_INDEX:
        return labels
    return labels.masked_fill(labels == HF_IGNORE_INDEX, ignore_index)


def _token_nll_update(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood of the supervised labels (float64), and their count."""
    nll = _row_nll(logits, target, ignore_index).sum(dtype=torch.float64)
    return nll, (target != ignore_index).sum()


def _decoded_supervised_spans(
    tokenizer: Any,
    preds: Tensor,
    target: Tensor,
    ignore_index: int,
) -> tuple[list[str], list[str]]:
    """Each row's predicted and reference ids at its supervised positions, decoded
    (``skip_special_tokens=True``)."""
    supervised = target != ignore_index
    predicted = [row[mask].tolist() for row, mask in zip(preds, supervised)]
    expected = [row[mask].tolist() for row, mask in zip(target, supervised)]
    return (
        tokenizer.batch_decode(predicted, skip_special_tokens=True),
        tokenizer.batch_decode(expected, skip_special_tokens=True),
    )


def _ratio(numerator: Tensor, denominator: Tensor, zero_division: float) -> Tensor:
    """``numerator / denominator`` as float32, ``zero_division`` where the denominator is 0.

    The division runs in float64 so that counts beyond 2**24 are not rounded before it.
    """
    value = numerator.double() / denominator.clamp(min=1).double()
    fallback = torch.full_like(value, zero_division)
    return torch.where(denominator > 0, value, fallback).float()


def bit_match_accuracy(
    preds: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    zero_division: float = 0.0,
    validate_args: bool = True,
) -> Tensor:
    """Token accuracy: matching supervised positions over supervised positions.

    A position is supervised when ``target != ignore_index``.

    Args:
        preds: token ids (B, L) or logits (B, L, V), already causally shifted.
        target: labels (B, L).
        ignore_index: label value of unsupervised positions.
        zero_division: value returned when there is no supervised position.
        validate_args: check label values (costs a host-device sync).

    Examples:
        >>> import torch
        >>> from mllm_metrics.functional import bit_match_accuracy
        >>> preds = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> target = torch.tensor([[1, 2, 0], [-100, 5, -100]])
        >>> bit_match_accuracy(preds, target)
        tensor(0.7500)

    """
    _check_token_inputs(preds, target, ignore_index, validate_args)
    return _ratio(*_bit_match_update(_argmax_ids(preds), target, ignore_index), zero_division)


def exact_match_accuracy(
    preds: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    zero_division: float = 0.0,
    validate_args: bool = True,
) -> Tensor:
    """Sequence accuracy: rows whose every supervised position matches, over counted rows.

    Rows without any supervised position are not counted at all (unlike
    ``torchmetrics.classification.MulticlassExactMatch``, which counts them as matches).

    Args:
        preds: token ids (B, L) or logits (B, L, V), already causally shifted.
        target: labels (B, L).
        ignore_index: label value of unsupervised positions.
        zero_division: value returned when no row has a supervised position.
        validate_args: check label values (costs a host-device sync).

    Examples:
        >>> import torch
        >>> from mllm_metrics.functional import exact_match_accuracy
        >>> preds = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
        >>> target = torch.tensor([[1, 2, -100], [4, 0, 6], [-100, -100, -100]])
        >>> exact_match_accuracy(preds, target)  # row 3 has no supervised position
        tensor(0.5000)

    """
    _check_token_inputs(preds, target, ignore_index, validate_args)
    return _ratio(*_exact_match_update(_argmax_ids(preds), target, ignore_index), zero_division)


def _as_text_list(texts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(text, str) for text in texts):
        raise TypeError(
            f"Expected `{name}` to be a string or a sequence of strings, got "
            f"{type(texts).__name__}"
            + (f" holding {type(texts[0]).__name__}" if isinstance(texts, Sequence) else "")
            + ". Likely cause: token ids passed to a text metric; decode them first."
        )
    return list(texts)


def _check_text_inputs(
    preds: str | Sequence[str], target: str | Sequence[str]
) -> tuple[list[str], list[str]]:
    preds_list, target_list = _as_text_list(preds, "preds"), _as_text_list(target, "target")
    if len(preds_list) != len(target_list):
        raise ValueError(
            f"Got {len(preds_list)} predicted strings but {len(target_list)} target strings; "
            "each prediction needs exactly one target."
        )
    return preds_list, target_list


def _positional_match_update(
    preds: Sequence[Sequence[Any]], target: Sequence[Sequence[Any]]
) -> tuple[int, int]:
    """Count equal elements position by position over the shorter length, and elements over
    the longer length (missing and extra elements both count as errors)."""
    correct = total = 0
    for predicted, expected in zip(preds, target):
        correct += sum(p == e for p, e in zip(predicted, expected))
        total += max(len(predicted), len(expected))
    return correct, total


def _equal_sequences_update(
    preds: Sequence[Sequence[Any]], target: Sequence[Sequence[Any]]
) -> tuple[int, int]:
    """Count equal sequences, and sequences."""
    return sum(list(p) == list(t) for p, t in zip(preds, target)), len(target)


def _text_bit_match_update(
    preds: list[str], target: list[str], alphabet: str | None
) -> tuple[int, int]:
    """Count equal characters over the shorter length, and characters over the longer length."""
    if alphabet is not None:
        keep = set(alphabet)
        preds = ["".join(char for char in text if char in keep) for text in preds]
        target = ["".join(char for char in text if char in keep) for text in target]
    return _positional_match_update(preds, target)


def text_bit_match_accuracy(
    preds: str | Sequence[str],
    target: str | Sequence[str],
    alphabet: str | None = None,
    zero_division: float = 0.0,
) -> Tensor:
    """Character accuracy of decoded text, position by position.

    Characters not in ``alphabet`` are dropped first (when given). Then correct = equal
    characters over the shorter length, total = the longer length, so both missing and extra
    characters count as errors.

    Args:
        preds: predicted strings (or one string).
        target: reference strings, one per prediction.
        alphabet: characters to keep, e.g. ``"01"`` to score only the bits of an answer.
        zero_division: value returned when there is no character to compare.

    Examples:
        >>> from mllm_metrics.functional import text_bit_match_accuracy
        >>> text_bit_match_accuracy(["0110", "01"], ["0111", "011"])
        tensor(0.7143)
        >>> text_bit_match_accuracy(["bits: 0 1 1"], ["011"], alphabet="01")
        tensor(1.)

    """
    preds_list, target_list = _check_text_inputs(preds, target)
    correct, total = _text_bit_match_update(preds_list, target_list, alphabet)
    return _ratio(torch.tensor(correct), torch.tensor(total), zero_division)


def text_exact_match(
    preds: str | Sequence[str], target: str | Sequence[str], zero_division: float = 0.0
) -> Tensor:
    """Fraction of predicted strings exactly equal to their reference.

    Args:
        preds: predicted strings (or one string).
        target: reference strings, one per prediction.
        zero_division: value returned for empty inputs.

    Examples:
        >>> from mllm_metrics.functional import text_exact_match
        >>> text_exact_match(["0110", "01", ""], ["0110", "011", ""])
        tensor(0.6667)

    """
    preds_list, target_list = _check_text_inputs(preds, target)
    correct, total = _equal_sequences_update(preds_list, target_list)
    return _ratio(torch.tensor(correct), torch.tensor(total), zero_division)
