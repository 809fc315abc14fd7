"""The model side of one evaluation batch, shared by the Lightning step and the Trainer forward.

Where a batch is seen with its model (a Lightning validation step, or the evaluation forward of
a model exposed to ``transformers.Trainer``), :class:`EvaluationForward` turns it into the
:class:`~mllm_metrics.evaluation.BatchResult` the evaluation core counts:

- the processed labels (:mod:`mllm_metrics.labels`), with the argmax ids and row NLL of the
  supervised positions only (:mod:`mllm_metrics.chunked`), or of the whole logits;
- each row's group, read from the batch and removed from it before the model sees it;
- the greedy answers and their references (:mod:`mllm_metrics.generation`).

A sharded model (FSDP, DeepSpeed ZeRO-3, tensor parallel) is detected from its parameters, and
its processes then decode the same number of steps (see :func:`is_sharded`).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mllm_metrics._warning import MllmMetricsWarning
from mllm_metrics.chunked import (
    _check_chunk_size,
    argmax_in_chunks,
    is_sharded_module,
    supervised_head_predictions,
)
from mllm_metrics.evaluation import BatchResult
from mllm_metrics.functional import _check_token_inputs, _hf_ignored, _row_nll, causal_shift
from mllm_metrics.generation import (
    _accepts,
    build_prompts,
    end_of_sequence_ids,
    greedy_answers,
)
from mllm_metrics.grouped import _check_groups, group_ids
from mllm_metrics.labels import (
    PREPARE_METHOD,
    AlignedForward,
    AlignedHiddenStates,
    _label_producers,
    aligned_forward,
    aligned_hidden_states,
    batch_rows,
    select_aligned_labels,
)

__all__ = ["EvaluationForward", "is_sharded", "batch_rows"]


def is_sharded(model: nn.Module) -> bool:
    """Whether calling ``model`` is a collective over processes: parameters sharded by FSDP
    (``fully_shard``, or FSDP1's flat parameters), DeepSpeed ZeRO-3 (partitioned parameters) or
    tensor parallelism (DTensor). Every process must then make the same calls into it per batch,
    whatever its data. Decided from the model itself, so a user's own strategy, accelerate or
    plain torchrun are recognised as well as Lightning's and ``Trainer``'s."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # no model is sharded before its import
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    return any(
        (fsdp1 is not None and isinstance(module, fsdp1)) or is_sharded_module(module)
        for module in model.modules()
    )


def _is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face model: it computes a loss only when given labels and never rewrites them
    unless it has a label-producing method (Llava before 4.45)."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _pad_token_id(model: nn.Module) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def _check_generation_arguments(max_new_tokens: int | None) -> None:
    if max_new_tokens is not None and (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ValueError(
            "Expected `generate_max_new_tokens` to be a positive int or None, got "
            f"{max_new_tokens!r}."
        )


def _check_no_stray_text(model: nn.Module, batch: Mapping[str, Any]) -> None:
    """Raise for a batch key that holds strings the model does not name (a group column without
    ``group_key``): a forward with ``**kwargs`` swallows it, ``generate`` fails on it."""
    for key, value in batch.items():
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(item, str) for item in value)
            and not _accepts(model, key)
            and not (
                hasattr(model, PREPARE_METHOD)
                and key in inspect.signature(getattr(model, PREPARE_METHOD)).parameters
            )
        ):
            shown = list(value[:3]) + (["..."] if len(value) > 3 else [])
            raise ValueError(
                f"The batch key {key!r} holds strings ({shown}), which "
                f"{type(model).__name__}.forward does not take, and every key of the batch is "
                "passed to the model. If it says which group each row belongs to, pass "
                f"`group_key={key!r}` and `groups=[...]`; otherwise leave it out of the batch in "
                "the collate function."
            )


# Keys of a padding-free ("packed") batch: several sequences in one row, told apart by these.
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "seq_idx")


def _check_not_packed(batch: Mapping[str, Any]) -> None:
    """Raise for a padding-free batch (several sequences packed into one row): every metric
    that counts samples (exact-match, groups, records) would count the row as one."""
    packed = next((key for key in _PACKED_KEYS if batch.get(key) is not None), None)
    positions, mask = batch.get("position_ids"), batch.get("attention_mask")
    if packed is None and isinstance(positions, Tensor) and positions.ndim == 2:
        steps = positions[:, 1:] < positions[:, :-1]  # a position that restarts within a row
        if isinstance(mask, Tensor) and mask.shape == positions.shape:
            steps &= mask[:, 1:].bool() & mask[:, :-1].bool()  # not left padding's own positions
        if bool(steps.any()):
            packed = "position_ids"
    if packed is not None:
        raise ValueError(
            f"The batch packs several sequences into one row (its `{packed}` says so): "
            "exact-match, the groups and the records would count each row as one sample. "
            "Evaluate without packing (TRL: `SFTConfig(padding_free=False, packing=False)` for "
            "the eval set)."
        )


class EvaluationForward:
    """One evaluation batch through the model, to the :class:`BatchResult` the core counts.

    Args:
        ignore_index: label value of unsupervised positions.
        logits_chunk_size: apply the output head to the supervised positions only, this many
            at a time (:mod:`mllm_metrics.chunked`); None computes the whole logits. A model
            that cannot be split runs its own forward, with a warning when a chunk size was
            asked for.
        group_key: the batch key of each row's group, removed from the batch; None without
            groups.
        groups: the group names (with ``group_key``).
        generate_max_new_tokens: also decode greedy answers of at most this many tokens; None
            never generates.
        eos_token_id: the id(s) that end an answer; default the model's.

    Examples:
        >>> import torch
        >>> from mllm_metrics.demo import TinyLlavaForCausalLM, make_multimodal_batch
        >>> from mllm_metrics.demo import tiny_llava_config
        >>> _ = torch.manual_seed(0)
        >>> model = TinyLlavaForCausalLM(tiny_llava_config()).eval()
        >>> batch = make_multimodal_batch([[1, -200, 5]], [[7, 8, 2]], torch.rand(1, 1, 8, 8))
        >>> result, _ = EvaluationForward(logits_chunk_size=2)(model, batch)
        >>> batch["input_ids"].shape, result.target.shape  # 1 placeholder became 4 positions
        (torch.Size([1, 6]), torch.Size([1, 8]))

    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        logits_chunk_size: int | None = None,
        group_key: str | None = None,
        groups: Sequence[str] | None = None,
        generate_max_new_tokens: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> None:
        if logits_chunk_size is not None:
            _check_chunk_size(logits_chunk_size)
        if (group_key is None) != (groups is None):
            raise ValueError(
                "`group_key` and `groups` go together: the key of each row's group in the batch, "
                f"and the names of all the groups; got group_key={group_key!r}, groups={groups!r}."
            )
        _check_generation_arguments(generate_max_new_tokens)
        self.ignore_index = ignore_index
        self.logits_chunk_size = logits_chunk_size
        self.group_key = group_key
        self.groups = None if groups is None else _check_groups(groups)
        self.generate_max_new_tokens = generate_max_new_tokens
        self.eos_token_id = eos_token_id
        self._cannot_split = False
        self._warned_short = False
        self._warned_no_end = False

    # ---- the batch ----------------------------------------------------------------------------

    def model_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The batch without the group key, which is ours, not the model's."""
        if self.group_key is None or self.group_key not in batch:
            return batch
        return {key: value for key, value in batch.items() if key != self.group_key}

    def group_ids(self, batch: Mapping[str, Any], device: torch.device) -> Tensor | None:
        """Each row's group position (B,), from ``batch[group_key]``; None without groups."""
        if self.group_key is None:
            return None
        assert self.groups is not None
        if self.group_key not in batch:
            raise ValueError(
                f"The batch has no {self.group_key!r} (`group_key`); its keys: {sorted(batch)}. "
                "Every evaluation batch must say which group each row belongs to."
            )
        value = batch[self.group_key]
        rows = batch_rows(batch)
        return group_ids(value, self.groups, len(value) if rows is None else rows, device)

    # ---- the forward --------------------------------------------------------------------------

    def __call__(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        *,
        generate: bool = True,
        model_loss: bool = False,
        call: Callable[..., Any] | None = None,
    ) -> tuple[BatchResult, Tensor | None]:
        """The batch's result, and the model's own loss when its full forward computed one.

        Args:
            model: the model (not wrapped in DDP; evaluation mode is the caller's).
            batch: the data-set batch, a dict with ``labels`` (and the group key).
            generate: decode greedy answers for this batch (when generation is configured).
            model_loss: where the full forward runs, keep the labels in it so that the model
                computes its own loss (otherwise a Hugging Face model is called without them:
                the NLL is taken once, from the processed labels); without a chunk size the
                full forward then always runs.
            call: what runs the model's full forward (default: ``model`` itself; the exposed
                forward passes the model's own ``forward``).

        """
        group = self.group_ids(batch, self._device_of(model))
        model_inputs = self.model_batch(batch)
        _check_no_stray_text(model, model_inputs)
        _check_not_packed(model_inputs)
        own_forward = model_loss and self.logits_chunk_size is None
        split = None if own_forward else self._split_forward(model, model_inputs)
        loss = None
        if split is None or self.logits_chunk_size is None:
            if split is None:
                full = self._full_forward(model, model_inputs, model_loss, call)
                logits, labels, loss = full.logits, full.labels, full.loss
            else:  # the whole logits from the split: no loss of the model's own
                logits, labels = split.logits(split.hidden_states), split.labels
            labels = self._checked_labels(labels, model_inputs)
            preds, target = causal_shift(logits, labels)
            _check_token_inputs(logits[:, :-1], target, self.ignore_index)
            row_nll = _row_nll(logits[:, :-1], target, self.ignore_index)
        else:
            labels = self._checked_labels(split.labels, model_inputs)
            chunked = supervised_head_predictions(
                split.hidden_states,
                split.output_head,
                labels,
                self.logits_chunk_size,
                self.ignore_index,
                split.logit_transform,
            )
            preds, target, row_nll = chunked.preds, chunked.target, chunked.row_nll
        result = BatchResult(preds=preds, target=target, row_nll=row_nll, group=group)
        if self.generate_max_new_tokens is not None and generate:
            result.generated, result.references = self.greedy_answers(model, model_inputs)
        return result, loss

    def greedy_answers(
        self, model: nn.Module, batch: Mapping[str, Any]
    ) -> tuple[list[list[int] | None], list[list[int] | None]]:
        """Each row's greedy answer and its reference (None for a row without an answer)."""
        assert self.generate_max_new_tokens is not None
        prompts = build_prompts(batch, self.ignore_index, _pad_token_id(model))
        end_ids = end_of_sequence_ids(model, self.eos_token_id)
        answers = greedy_answers(
            model, batch, prompts, self.generate_max_new_tokens, end_ids, is_sharded(model)
        )
        references = prompts.references
        counted = [ref for ref in references if ref is not None]
        self._warn_if_too_short(counted)
        self._warn_if_no_end(counted, end_ids)
        generated = [
            answer if reference is not None else None
            for answer, reference in zip(answers, references)
        ]
        return generated, references

    def _checked_labels(self, labels: Tensor | None, batch: Mapping[str, Any]) -> Tensor:
        if labels is None:
            raise ValueError(
                f"The evaluation batch has no `labels` (keys: {sorted(batch)}); the metrics "
                "compare the model's predictions with the labels, so the batch must hold them."
            )
        return _hf_ignored(labels, self.ignore_index)

    def _split_forward(
        self, model: nn.Module, batch: Mapping[str, Any]
    ) -> AlignedHiddenStates | None:
        if self._cannot_split:
            return None
        split = aligned_hidden_states(model, batch)
        if split is None:
            self._cannot_split = True
            if self.logits_chunk_size is None:
                return None
            warnings.warn(
                f"`logits_chunk_size` is set but {type(model).__name__} cannot be run up to "
                "its hidden states and output head separately (no `get_output_embeddings()` "
                "Linear head and `base_model`, or a logit transform after the head); using the "
                "full forward, which holds the whole (batch, seq_len, vocab) logits.",
                category=MllmMetricsWarning,
                stacklevel=3,
            )
        return split

    @staticmethod
    def _full_forward(
        model: nn.Module,
        batch: Mapping[str, Any],
        model_loss: bool,
        call: Callable[..., Any] | None = None,
    ) -> AlignedForward:
        """The model's forward and its aligned labels; without ``model_loss`` its own loss is
        not computed when the labels are not needed to align (the NLL is taken once)."""
        labels = batch.get("labels")
        if (
            model_loss
            or labels is None
            or not _is_transformers_model(model)
            or _label_producers(model)
        ):
            return aligned_forward(model, batch, call=call)
        without_labels = {k: v for k, v in batch.items() if k != "labels"}
        result = aligned_forward(model, without_labels, call=call)
        result.labels = select_aligned_labels(result.outputs, labels)
        return result

    @staticmethod
    def _device_of(model: nn.Module) -> torch.device:
        parameter = next(model.parameters(), None)
        return torch.device("cpu") if parameter is None else parameter.device

    def _warn_if_too_short(self, references: list[list[int]]) -> None:
        assert self.generate_max_new_tokens is not None
        longest = max(map(len, references), default=0)
        if longest > self.generate_max_new_tokens and not self._warned_short:
            self._warned_short = True
            warnings.warn(
                f"A reference answer has {longest} tokens but `generate_max_new_tokens` is "
                f"{self.generate_max_new_tokens}: such answers cannot be generated whole and count "
                "as misses in the gen_* metrics. Raise `generate_max_new_tokens`.",
                category=MllmMetricsWarning,
                stacklevel=4,
            )

    def _warn_if_no_end(self, references: list[list[int]], end_ids: list[int]) -> None:
        if self._warned_no_end or all(ref and ref[-1] in end_ids for ref in references):
            return
        self._warned_no_end = True
        warnings.warn(
            f"A reference answer does not end with an end-of-sequence token {end_ids}: a "
            "generated answer ends only at one (or after `generate_max_new_tokens`), so such "
            "rows can match only if the model stops there by chance. Supervise the end token in "
            "the labels (as Hugging Face's data collators do), or pass `eos_token_id=`.",
            category=MllmMetricsWarning,
            stacklevel=4,
        )

    # ---- predictions at every position (predict) ---------------------------------------------

    def all_predictions(
        self, model: nn.Module, batch: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor | None]:
        """Argmax ids at every position, shifted, (B, L' - 1), and the processed labels
        shifted by one (None without labels); the head is applied ``logits_chunk_size``
        positions at a time and the logits are never kept."""
        model_inputs = self.model_batch(batch)
        split = self._split_forward(model, model_inputs)
        if split is None:
            result = self._full_forward(model, model_inputs, model_loss=False)
            labels = result.labels
            ids = result.logits[:, :-1].argmax(dim=-1)
        else:
            labels = split.labels
            hidden = split.hidden_states[:, :-1]
            chunk = self.logits_chunk_size or hidden.shape[0] * hidden.shape[1] or 1
            flat = hidden.reshape(-1, hidden.shape[-1])
            ids = argmax_in_chunks(flat, split.output_head, chunk, split.logit_transform)
            ids = ids.view(hidden.shape[:2])
        return ids, None if labels is None else _hf_ignored(labels, self.ignore_index)[:, 1:]
