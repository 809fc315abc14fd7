"""The output head applied to the supervised positions only, a few at a time.

A causal LM's logits are ``(batch, seq_len, vocab_size)`` floats: at Qwen2-VL's vocabulary and
one eval batch of 8 x 4096 positions, 20 GB in float32, while the metrics need one id and one
negative log-likelihood per *supervised* position, and a LLaVA-style row is mostly image-feature
and prompt positions that nothing scores. :func:`supervised_head_predictions` takes the final
hidden states (see :func:`mllm_metrics.labels.aligned_hidden_states`), keeps the positions
whose *shifted* label is supervised, and applies the output head to at most ``chunk_size`` of
them at a time, keeping each chunk's argmax ids and NLL. The Lightning module and the
``transformers.Trainer`` path (:func:`mllm_metrics.hf.expose_processed_labels` with
``logits_chunk_size``) both use it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mllm_metrics.functional import _check_label_values, _check_labels_dtype

__all__ = ["DEFAULT_LOGITS_CHUNK_SIZE", "NOT_PREDICTED", "SupervisedPredictions"]

#: The value of the predictions at unsupervised positions, whose logits are never computed:
#: no token id and no ``ignore_index`` in use (-100, -1) equals it, so a metric that compares
#: every position never counts one of them as a match.
NOT_PREDICTED = -(2**31)

#: 256 positions at a time: at V = 151936 (Qwen2-VL) a chunk's float32 logits take ~155 MB
#: (the NLL is computed in their place), far below what one decoder layer of a 7B model needs
#: for 4096 positions; fewer positions per call start to cost time (each call re-reads the
#: head's weights). (TRL 1.16's chunked log-prob kernel tiles differently: 4096 positions by
#: 32768 vocabulary columns.)
DEFAULT_LOGITS_CHUNK_SIZE = 256


@dataclass
class SupervisedPredictions:
    """What the metrics need from one batch, computed without the full logits.

    Attributes:
        preds: argmax ids, shape (batch, seq_len - 1), aligned with ``target`` (the causal shift
            is applied); :data:`NOT_PREDICTED` at unsupervised positions.
        target: ``labels[:, 1:]``.
        row_nll: each row's summed NLL over its supervised positions, shape (batch,), float64.

    """

    preds: Tensor
    target: Tensor
    row_nll: Tensor


def _check_chunk_size(chunk_size: object) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(
            f"Expected `logits_chunk_size` to be a positive int or None, got {chunk_size!r}."
        )
    return chunk_size


def _nll_in_place(logits: Tensor, target: Tensor, maxima: Tensor) -> Tensor:
    """``cross_entropy(logits, target, reduction="none")``, overwriting ``logits`` (no longer
    needed) instead of allocating a log-softmax of the same size: the chunk's peak is its
    logits alone. The same formula as ``log_softmax``: ``log(sum(exp(x - max))) + max - x_t``,
    with ``maxima`` the rows' maxima (taken with the argmax).
    """
    target_logits = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    logits.sub_(maxima.unsqueeze(1)).exp_()
    return logits.sum(dim=-1).log_().add_(maxima).sub_(target_logits)


@torch.no_grad()
def supervised_head_predictions(
    hidden_states: Tensor,
    output_head: nn.Module,
    labels: Tensor,
    chunk_size: int,
    ignore_index: int = -100,
    logit_transform: Callable[[Tensor], Tensor] | None = None,
) -> SupervisedPredictions:
    """Argmax ids and summed NLL at the supervised positions, ``chunk_size`` positions at a time.

    Position ``t`` of ``hidden_states`` predicts ``labels[:, t + 1]`` (the shift of Hugging
    Face's ``ForCausalLMLoss``); positions whose next label is ``ignore_index`` (prompt, image
    features, padding, the last position) never reach the head. The NLL is the cross-entropy of
    the float32 logits, summed per row in float64.

    A head that is sharded (DeepSpeed ZeRO-3, FSDP2) gathers its weights at each call, a
    collective: it is then called exactly once per batch on every process, with every chunk
    computed inside that call, so that processes with different numbers of supervised positions
    stay in step.

    Args:
        hidden_states: final hidden states, shape (batch, seq_len, hidden).
        output_head: the module turning hidden states into logits (``get_output_embeddings()``).
        labels: labels aligned with ``hidden_states``, shape (batch, seq_len).
        chunk_size: the most positions given to the head in one call.
        ignore_index: label value of unsupervised positions.
        logit_transform: what the model applies to the head's logits (e.g. Gemma's soft cap),
            applied to each chunk's logits in the head's dtype, before they are upcast.

    Returns:
        The predictions, shifted target and row NLL.

    Examples:
        >>> import torch
        >>> head = torch.nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        >>> hidden = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])
        >>> labels = torch.tensor([[-100, 1, 1]])  # positions 0 and 1 predict labels 1 and 1
        >>> result = supervised_head_predictions(hidden, head, labels, chunk_size=1)
        >>> result.preds.tolist(), result.target.tolist()  # position 0 predicts label 1 as 0
        ([[0, 1]], [[1, 1]])

    """
    _check_chunk_size(chunk_size)
    _check_labels_dtype(labels, "labels")
    target = labels[:, 1:]
    vocab_size = getattr(output_head, "out_features", None)
    _check_label_values(target, ignore_index, vocab_size)  # before any head call: a clear error
    hidden = hidden_states[:, :-1]
    rows, positions = (target != ignore_index).nonzero(as_tuple=True)  # one host sync
    preds = torch.full_like(target, NOT_PREDICTED, dtype=torch.long)
    row_nll = torch.zeros(target.shape[0], dtype=torch.float64, device=target.device)

    def run_chunks(head: Callable[[Tensor], Tensor]) -> None:
        for start in range(0, rows.numel(), chunk_size):
            chunk_rows = rows[start : start + chunk_size]
            chunk_positions = positions[start : start + chunk_size]
            logits = head(hidden[chunk_rows, chunk_positions])
            if logit_transform is not None:  # in the head's dtype, as the model applies it
                logits = logit_transform(logits)
            logits = logits.float()
            chunk_target = target[chunk_rows, chunk_positions].long()
            maxima, preds[chunk_rows, chunk_positions] = logits.max(dim=-1)  # one pass for both
            nll = _nll_in_place(logits, chunk_target, maxima)
            row_nll.index_add_(0, chunk_rows, nll.double())
            del logits

    if is_sharded_module(output_head):
        # A sharded head gathers its weights at each call (a collective): one call on every
        # process, whatever its number of supervised positions, and the chunks inside it.
        _inside_one_call(output_head, hidden, lambda: run_chunks(_linear_of(output_head)))
    else:
        run_chunks(output_head)
    return SupervisedPredictions(preds=preds, target=target, row_nll=row_nll)


@torch.no_grad()
def argmax_in_chunks(
    hidden: Tensor,
    output_head: nn.Module,
    chunk_size: int,
    logit_transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The argmax ids of ``output_head`` at every one of ``hidden``'s (N, hidden) positions,
    ``chunk_size`` at a time (a sharded head: in one call, as above)."""
    ids = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)

    def run_chunks(head: Callable[[Tensor], Tensor]) -> None:
        for start in range(0, hidden.shape[0], chunk_size):
            logits = head(hidden[start : start + chunk_size])
            if logit_transform is not None:
                logits = logit_transform(logits)
            ids[start : start + chunk_size] = logits.argmax(dim=-1)

    if is_sharded_module(output_head):
        _inside_one_call(output_head, hidden, lambda: run_chunks(_linear_of(output_head)))
    else:
        run_chunks(output_head)
    return ids


def is_sharded_module(module: nn.Module) -> bool:
    """Whether calling ``module`` gathers its own parameters from the other processes: DeepSpeed
    ZeRO-3 partitioned parameters, an FSDP2 module, or DTensor (sharded) parameters. (Of a whole
    model: :func:`~mllm_metrics.forward.is_sharded`.)"""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is not None and isinstance(module, fsdp_module):
        return True
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return any(
        hasattr(parameter, "ds_id") or (dtensor is not None and isinstance(parameter, dtensor))
        for parameter in module.parameters(recurse=False)
    )


def _linear_of(head: nn.Module) -> Callable[[Tensor], Tensor]:
    """The head as a function of its (gathered) weights, without calling the module again."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"Expected a Linear output head, got {type(head).__name__}.")
    return lambda hidden: nn.functional.linear(hidden, head.weight, head.bias)


def _inside_one_call(module: nn.Module, like: Tensor, compute: Callable[[], None]) -> None:
    """Run ``compute()`` inside exactly one call of ``module``: its hooks (which gather its
    weights before and release them after) run once, and the module order of the call is the
    model's own (ZeRO-3 records it to prefetch)."""
    had_own = "forward" in vars(module)
    own = vars(module).get("forward")

    def forward(hidden: Tensor) -> Tensor:
        compute()
        return hidden

    module.forward = forward
    try:
        module(like.new_zeros(0, like.shape[-1]))
    finally:
        if had_own:
            module.forward = own
        else:
            del module.forward
