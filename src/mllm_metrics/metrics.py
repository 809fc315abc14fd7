"""Streaming metrics: integer sum states, one all-reduce at ``compute()``, exact under DDP."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from mllm_metrics.functional import (
    _argmax_ids,
    _bit_match_rows,
    _bit_match_update,
    _check_text_inputs,
    _check_token_inputs,
    _equal_sequences_update,
    _exact_match_rows,
    _exact_match_update,
    _positional_match_update,
    _ratio,
    _row_nll,
    _text_bit_match_update,
    _token_nll_update,
)

__all__ = [
    "BitMatchAccuracy",
    "ExactMatchAccuracy",
    "GeneratedBitMatch",
    "GeneratedExactMatch",
    "TextBitMatchAccuracy",
    "TextExactMatch",
    "TokenNLL",
    "causal_lm_metrics",
]


# What `Metric.forward`/`update` change besides the states: restored with them on an error.
_BOOKKEEPING = (
    "_update_count",
    "_computed",
    "_forward_cache",
    "_to_sync",
    "_should_unsync",
    "_enable_grad",
    "compute_on_cpu",
    "_is_synced",
    "_cache",
)


@contextmanager
def _unchanged_on_error(metrics: Iterable[Metric], copy_states: bool = True) -> Iterator[None]:
    """Put every state of ``metrics`` back as it was if the block raises, then re-raise.

    ``Metric.forward`` resets the states before calling ``update`` and merges the saved ones
    back only after it returns, so a batch rejected inside ``update`` would otherwise wipe
    everything accumulated so far; a ``MetricCollection`` would keep the batch in the metrics
    updated before the one that raised. ``copy_states=False`` keeps references only, enough for
    metrics that never change a state tensor in place (ours).
    """
    saved = []
    for metric in metrics:
        states = {}
        for name in metric._defaults:
            value = getattr(metric, name)
            if isinstance(value, list):
                value = list(value)
            elif copy_states and isinstance(value, Tensor):
                value = value.clone()
            states[name] = value
        flags = {name: getattr(metric, name) for name in _BOOKKEEPING if hasattr(metric, name)}
        saved.append((metric, states | flags))
    try:
        yield
    except BaseException:
        for metric, attributes in saved:
            for name, value in attributes.items():
                setattr(metric, name, value)
        raise


class _SumStates(Metric):
    """A metric whose states are sums: a batch is added whole or not at all, and ``compute()``
    without any update is a valid answer (the sums are zero), given silently: a process that
    got no batch still computes (and syncs) with the others."""

    def _wrap_update(self, update: Callable) -> Callable:
        # torchmetrics wraps `update` here, at construction and after unpickling; the wrapper
        # itself counts the update before calling it, so the whole of it is made atomic.
        counted_update = super()._wrap_update(update)

        @functools.wraps(update)
        def whole_batch_or_nothing(*args: Any, **kwargs: Any) -> None:
            with _unchanged_on_error([self], copy_states=False):
                return counted_update(*args, **kwargs)

        return whole_batch_or_nothing

    def _wrap_compute(self, compute: Callable) -> Callable:
        synced_compute = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def compute_from_sums(*args: Any, **kwargs: Any) -> Any:
            if self._update_count:
                return synced_compute(*args, **kwargs)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*called before the ``update``")
                return synced_compute(*args, **kwargs)

        return compute_from_sums

    def _count_external_update(self) -> None:
        """Book sums added outside ``update`` (e.g. by the chunked head) as one update, as
        torchmetrics' wrapper does for ``update``: the cached result is stale."""
        self._computed = None
        self._update_count += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The batch's value, accumulating the batch as ``update`` does; a bad batch changes
        nothing (plain ``Metric.forward`` would lose every count accumulated so far)."""
        with _unchanged_on_error([self], copy_states=False):
            return super().forward(*args, **kwargs)


class _CountRatio(_SumStates):
    """A ratio of two int64 counts summed across batches and ranks.

    Subclasses name their two states (unique per metric, so that ``MetricCollection`` compute
    groups never merge two different metrics) and add one batch's counts with ``_add``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    _numerator_state: str
    _denominator_state: str
    _numerator_dtype = torch.long

    def __init__(self, zero_division: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(zero_division, (int, float)) or isinstance(zero_division, bool):
            raise TypeError(
                f"Expected `zero_division` to be a float, got {type(zero_division).__name__}."
            )
        if not (0.0 <= zero_division <= 1.0 or math.isnan(zero_division)):
            raise ValueError(f"Expected `zero_division` in [0, 1] or nan, got {zero_division}.")
        self.zero_division = float(zero_division)
        numerator = torch.tensor(0, dtype=self._numerator_dtype)
        self.add_state(self._numerator_state, numerator, dist_reduce_fx="sum")
        denominator = torch.tensor(0, dtype=torch.long)
        self.add_state(self._denominator_state, denominator, dist_reduce_fx="sum")

    def _update_sums(self, numerator: Tensor | int, denominator: Tensor | int) -> None:
        """Add sums computed elsewhere (e.g. by the chunked head), counted as one update."""
        self._count_external_update()
        self._add(numerator, denominator)

    def _add(self, numerator: Tensor | int, denominator: Tensor | int) -> None:
        # Both counts are computed before either state changes, so a rejected batch changes none.
        # Out of place: states created under inference mode (a first `trainer.validate`) cannot
        # be updated in place later, outside it (validation inside `fit` runs under no_grad).
        setattr(self, self._numerator_state, getattr(self, self._numerator_state) + numerator)
        setattr(self, self._denominator_state, getattr(self, self._denominator_state) + denominator)

    def compute(self) -> Tensor:
        """The ratio of the two summed counts, or ``zero_division`` when the denominator is 0."""
        numerator = getattr(self, self._numerator_state)
        return _ratio(numerator, getattr(self, self._denominator_state), self.zero_division)

    def plot(
        self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None
    ) -> _PLOT_OUT_TYPE:
        """Plot one value or a sequence of values of this metric (needs matplotlib).

        Args:
            val: a result of ``forward``/``compute`` or a list of them; ``compute()`` if None.
            ax: a matplotlib axis to draw into.

        Returns:
            The figure and the axis.

        """
        return self._plot(val, ax)


class _TokenCountRatio(_CountRatio):
    def __init__(
        self,
        ignore_index: int = -100,
        zero_division: float = 0.0,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(zero_division=zero_division, **kwargs)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(
                f"Expected `ignore_index` to be an int, got {type(ignore_index).__name__}."
            )
        self.ignore_index = ignore_index
        self.validate_args = validate_args

    def _check(self, preds: Tensor, target: Tensor) -> None:
        """Raise a clear error for inputs ``update`` cannot count correctly."""
        _check_token_inputs(preds, target, self.ignore_index, self.validate_args)

    def _row_sums(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's numerator and denominator, (B,): what ``update`` adds, row by row."""
        raise NotImplementedError


class BitMatchAccuracy(_TokenCountRatio):
    r"""Token accuracy of a language model over the supervised positions, streamed and DDP-exact.

    .. math:: \text{BitMatch} = \frac{\#\{t : y_t \neq \text{ignore}, \hat y_t = y_t\}}
        {\#\{t : y_t \neq \text{ignore}\}}

    Feed it causally shifted predictions and the labels the logits align with (see
    :func:`mllm_metrics.functional.causal_shift` and :mod:`mllm_metrics.labels`).

    As input to ``forward`` and ``update`` the metric accepts:

    - ``preds`` (:class:`~torch.Tensor`): int token ids of shape ``(B, L)`` or float logits of
      shape ``(B, L, V)`` (argmax over the last dim, in the logits' dtype and device).
    - ``target`` (:class:`~torch.Tensor`): int labels of shape ``(B, L)``.

    As output of ``forward`` and ``compute`` the metric returns a float scalar tensor.

    States: ``bit_match_correct`` and ``bit_match_total``, int64, summed across processes.

    Args:
        ignore_index: label value of unsupervised positions (prompt, padding, image features).
        zero_division: value returned when nothing supervised has been seen.
        validate_args: check label values on every update (a host-device sync); ``False``
            keeps only the free shape, dtype and device checks.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ...).

    Examples:
        >>> import torch
        >>> from mllm_metrics import BitMatchAccuracy
        >>> metric = BitMatchAccuracy()
        >>> preds = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> target = torch.tensor([[1, 2, 0], [-100, 5, -100]])
        >>> metric(preds, target)
        tensor(0.7500)
        >>> metric.update(torch.tensor([[7, 8]]), torch.tensor([[7, 0]]))
        >>> metric.compute()  # (3 + 1) / (4 + 2)
        tensor(0.6667)

    """

    _numerator_state = "bit_match_correct"
    _denominator_state = "bit_match_total"
    bit_match_correct: Tensor
    bit_match_total: Tensor

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch's matching and supervised positions."""
        self._check(preds, target)
        self._add(*_bit_match_update(_argmax_ids(preds), target, self.ignore_index))

    def _row_sums(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return _bit_match_rows(_argmax_ids(preds), target, self.ignore_index)


class ExactMatchAccuracy(_TokenCountRatio):
    r"""Sequence accuracy: the share of samples whose every supervised position is predicted.

    A sample with no supervised position is not counted at all. This differs on purpose from
    :class:`torchmetrics.classification.MulticlassExactMatch`, which counts such a sample as a
    match: a row truncated down to its prompt has no answer to get right.

    As input to ``forward`` and ``update`` the metric accepts:

    - ``preds`` (:class:`~torch.Tensor`): int token ids of shape ``(B, L)`` or float logits of
      shape ``(B, L, V)`` (argmax over the last dim).
    - ``target`` (:class:`~torch.Tensor`): int labels of shape ``(B, L)``.

    As output of ``forward`` and ``compute`` the metric returns a float scalar tensor.

    States: ``exact_match_correct`` and ``exact_match_total``, int64, summed across processes.

    Args:
        ignore_index: label value of unsupervised positions.
        zero_division: value returned when no counted sample has been seen.
        validate_args: check label values on every update (a host-device sync).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> import torch
        >>> from mllm_metrics import ExactMatchAccuracy
        >>> metric = ExactMatchAccuracy()
        >>> preds = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
        >>> target = torch.tensor([[1, 2, -100], [4, 0, 6], [-100, -100, -100]])
        >>> metric(preds, target)  # the last row has no supervised position
        tensor(0.5000)
        >>> metric.exact_match_correct, metric.exact_match_total
        (tensor(1), tensor(2))

    """

    _numerator_state = "exact_match_correct"
    _denominator_state = "exact_match_total"
    exact_match_correct: Tensor
    exact_match_total: Tensor

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch's fully matched samples and samples with a supervised position."""
        self._check(preds, target)
        self._add(*_exact_match_update(_argmax_ids(preds), target, self.ignore_index))

    def _row_sums(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return _exact_match_rows(_argmax_ids(preds), target, self.ignore_index)


class TokenNLL(_TokenCountRatio):
    r"""Token-weighted mean negative log-likelihood over the supervised positions.

    The loss a causal LM reports per batch is a mean over that batch's tokens; averaging those
    means weights batches, not tokens. This metric sums the NLL (float64) and counts the tokens
    (int64) across batches and processes, so ``compute()`` is the mean over every supervised
    token of the eval set: the loss of one batch holding all the data.

    As input to ``forward`` and ``update`` the metric accepts:

    - ``logits`` (:class:`~torch.Tensor`): float logits of shape ``(B, L, V)``, causally shifted.
    - ``target`` (:class:`~torch.Tensor`): int labels of shape ``(B, L)``.

    States: ``nll_sum`` (float64) and ``nll_tokens`` (int64), summed across processes.

    Args:
        ignore_index: label value of unsupervised positions.
        zero_division: value returned when no supervised token has been seen (nan by default:
            there is no loss to report).
        validate_args: check label values on every update (a host-device sync).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> import torch
        >>> from mllm_metrics import TokenNLL
        >>> metric = TokenNLL()
        >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
        >>> metric(logits, torch.tensor([[0, -100]]))  # -log(0.5)
        tensor(0.6931)

    """

    higher_is_better = False
    plot_upper_bound = None
    _numerator_state = "nll_sum"
    _denominator_state = "nll_tokens"
    _numerator_dtype = torch.float64
    nll_sum: Tensor
    nll_tokens: Tensor

    def __init__(
        self,
        ignore_index: int = -100,
        zero_division: float = float("nan"),
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(ignore_index, zero_division, validate_args, **kwargs)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add one batch's summed NLL and supervised token count."""
        self._check(logits, target)
        self._add(*_token_nll_update(logits, target, self.ignore_index))

    def _check(self, logits: Tensor, target: Tensor) -> None:
        if logits.ndim != 3:
            raise ValueError(
                f"Expected logits of shape (batch, seq_len, vocab_size), got shape "
                f"{tuple(logits.shape)}: the NLL needs the full distribution, not token ids."
            )
        super()._check(logits, target)

    def _row_sums(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        nll = _row_nll(logits, target, self.ignore_index)
        return nll, (target != self.ignore_index).sum(dim=1)


class TextBitMatchAccuracy(_CountRatio):
    """Character accuracy of decoded answers, position by position.

    Characters not in ``alphabet`` are dropped first (when given); then correct = equal
    characters over the shorter length and total = the longer length, so missing and extra
    characters both count as errors.

    As input to ``forward`` and ``update`` the metric accepts ``preds`` and ``target``: a string
    or a sequence of strings of the same length. It returns a float scalar tensor.

    States: ``text_bit_match_correct`` and ``text_bit_match_total``, int64, summed across
    processes.

    Args:
        alphabet: characters to keep before comparing, e.g. ``"01"``; None keeps all.
        zero_division: value returned when no character has been seen.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> from mllm_metrics import TextBitMatchAccuracy
        >>> metric = TextBitMatchAccuracy(alphabet="01")
        >>> metric(["0110", "0 1"], ["0111", "011"])  # (3 + 2) / (4 + 3)
        tensor(0.7143)

    """

    _numerator_state = "text_bit_match_correct"
    _denominator_state = "text_bit_match_total"
    text_bit_match_correct: Tensor
    text_bit_match_total: Tensor

    def __init__(
        self, alphabet: str | None = None, zero_division: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(zero_division=zero_division, **kwargs)
        if alphabet is not None and (not isinstance(alphabet, str) or not alphabet):
            raise ValueError(
                f"Expected `alphabet` to be a non-empty string or None, got {alphabet!r}."
            )
        self.alphabet = alphabet

    def update(self, preds: str | Sequence[str], target: str | Sequence[str]) -> None:
        """Add one batch's matching characters and compared characters."""
        self._add(*_text_bit_match_update(*_check_text_inputs(preds, target), self.alphabet))


class TextExactMatch(_CountRatio):
    """Share of decoded answers exactly equal to their reference string.

    As input to ``forward`` and ``update`` the metric accepts ``preds`` and ``target``: a string
    or a sequence of strings of the same length. It returns a float scalar tensor.

    States: ``text_exact_match_correct`` and ``text_exact_match_total``, int64, summed across
    processes.

    Args:
        zero_division: value returned when no string has been seen.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> from mllm_metrics import TextExactMatch
        >>> metric = TextExactMatch()
        >>> metric(["0110", "01"], ["0110", "011"])
        tensor(0.5000)

    """

    _numerator_state = "text_exact_match_correct"
    _denominator_state = "text_exact_match_total"
    text_exact_match_correct: Tensor
    text_exact_match_total: Tensor

    def update(self, preds: str | Sequence[str], target: str | Sequence[str]) -> None:
        """Add one batch's equal strings and strings."""
        self._add(*_equal_sequences_update(*_check_text_inputs(preds, target)))


def _check_answers(
    generated: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]
) -> tuple[list[list[int]], list[list[int]]]:
    def as_lists(answers: Any, name: str) -> list[list[int]]:
        if isinstance(answers, Tensor) and answers.ndim == 2:
            return answers.tolist()
        if (
            isinstance(answers, Sequence)
            and not isinstance(answers, str)
            and all(isinstance(answer, (Sequence, Tensor)) for answer in answers)
            and not any(isinstance(answer, str) for answer in answers)
        ):
            return [
                answer.tolist() if isinstance(answer, Tensor) else list(answer)
                for answer in answers
            ]
        raise TypeError(
            f"Expected `{name}` to be a sequence of answers, each a sequence of token ids, got "
            f"{type(answers).__name__}. Likely cause: decoded strings passed to a token metric; "
            "use TextBitMatchAccuracy / TextExactMatch for those."
        )

    generated_lists, reference_lists = (
        as_lists(generated, "generated"),
        as_lists(reference, "reference"),
    )
    if len(generated_lists) != len(reference_lists):
        raise ValueError(
            f"Got {len(generated_lists)} generated answers but {len(reference_lists)} reference "
            "answers; each generated answer needs exactly one reference."
        )
    return generated_lists, reference_lists


class GeneratedBitMatch(_CountRatio):
    """Token accuracy of generated (free-running) answers against their references.

    Correct = equal tokens position by position over the shorter length; total = the longer
    length, so missing and extra tokens are errors (the rule of
    :class:`TextBitMatchAccuracy`, on token ids). See :mod:`mllm_metrics.generation`.

    As input to ``forward`` and ``update`` the metric accepts ``generated`` and ``reference``:
    sequences of answers, each a sequence of token ids (lengths may differ). It returns a float
    scalar tensor.

    States: ``gen_bit_match_correct`` and ``gen_bit_match_total``, int64, summed across
    processes.

    Args:
        zero_division: value returned when no token has been seen.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> from mllm_metrics import GeneratedBitMatch
        >>> metric = GeneratedBitMatch()
        >>> metric([[5, 6, 2], [7, 2]], [[5, 6, 2], [7, 8, 2]])  # (3 + 1) / (3 + 3)
        tensor(0.6667)

    """

    _numerator_state = "gen_bit_match_correct"
    _denominator_state = "gen_bit_match_total"
    gen_bit_match_correct: Tensor
    gen_bit_match_total: Tensor

    def update(
        self, generated: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]
    ) -> None:
        """Add one batch's equal tokens and compared tokens."""
        self._add(*_positional_match_update(*_check_answers(generated, reference)))


class GeneratedExactMatch(_CountRatio):
    """Share of generated (free-running) answers equal to their reference, token for token.

    As input to ``forward`` and ``update`` the metric accepts ``generated`` and ``reference``:
    sequences of answers, each a sequence of token ids. It returns a float scalar tensor.

    States: ``gen_exact_match_correct`` and ``gen_exact_match_total``, int64, summed across
    processes.

    Args:
        zero_division: value returned when no answer has been seen.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> from mllm_metrics import GeneratedExactMatch
        >>> metric = GeneratedExactMatch()
        >>> metric([[5, 6, 2], [7, 2]], [[5, 6, 2], [7, 8, 2]])
        tensor(0.5000)

    """

    _numerator_state = "gen_exact_match_correct"
    _denominator_state = "gen_exact_match_total"
    gen_exact_match_correct: Tensor
    gen_exact_match_total: Tensor

    def update(
        self, generated: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]
    ) -> None:
        """Add one batch's equal answers and answers."""
        self._add(*_equal_sequences_update(*_check_answers(generated, reference)))


class _CausalLMMetrics(MetricCollection):
    """A ``MetricCollection`` that checks the inputs and takes the argmax once for its metrics.

    The checks (a host sync with ``validate_args``) and the argmax over the vocabulary are the
    costly steps of an update; the metrics inside skip their own checks.
    """

    def __init__(
        self,
        metrics: dict[str, Metric],
        ignore_index: int,
        validate_args: bool,
        prefix: str | None = None,
    ) -> None:
        super().__init__(metrics, prefix=prefix)
        self._ignore_index = ignore_index
        self._validate_args = validate_args

    def _ids(self, preds: Tensor, target: Tensor) -> Tensor:
        _check_token_inputs(preds, target, self._ignore_index, self._validate_args)
        return _argmax_ids(preds)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Update every metric with the argmax ids of ``preds``; a bad batch changes nothing."""
        with _unchanged_on_error(self.values(copy_state=False)):
            super().update(self._ids(preds, target), target)

    def forward(self, preds: Tensor, target: Tensor) -> dict[str, Any]:
        """Batch values of every metric, accumulating as ``update`` does."""
        with _unchanged_on_error(self.values(copy_state=False)):
            return super().forward(self._ids(preds, target), target)


def causal_lm_metrics(
    ignore_index: int = -100, prefix: str | None = None, **kwargs: Any
) -> MetricCollection:
    """The two token metrics of a causal LM, as one ``MetricCollection``.

    The inputs are checked and logits reduced to token ids once for both metrics.

    Args:
        ignore_index: label value of unsupervised positions.
        prefix: prepended to the keys, e.g. ``"val/"``.
        kwargs: passed to both metrics (``validate_args``, ``sync_on_compute``, ...).

    Returns:
        A collection with the keys ``bit_match`` and ``exact_match``.

    Examples:
        >>> import torch
        >>> from mllm_metrics import causal_lm_metrics
        >>> metrics = causal_lm_metrics(prefix="val/")
        >>> metrics.update(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 0]]))
        >>> {name: round(value.item(), 2) for name, value in metrics.compute().items()}
        {'val/bit_match': 0.75, 'val/exact_match': 0.5}

    """
    validate_args = kwargs.pop("validate_args", True)
    kwargs |= {"ignore_index": ignore_index, "validate_args": False}  # checked by the collection
    return _CausalLMMetrics(
        {"bit_match": BitMatchAccuracy(**kwargs), "exact_match": ExactMatchAccuracy(**kwargs)},
        ignore_index=ignore_index,
        validate_args=validate_args,
        prefix=prefix,
    )
