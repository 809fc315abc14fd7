"""What travels through ``Trainer``'s gather: a batch's values as tensors it can pad and gather.

``Trainer`` hands the evaluation forward's outputs (less ``loss``) to
``preprocess_logits_for_metrics`` as a tuple of tensors, pads each of them across processes
along dim 1 with -100, gathers them along dim 0 (dropping the samples its sampler repeated) and
hands them to ``compute_metrics``, one batch at a time (``batch_eval_metrics``) or concatenated
over the eval set. The field names are lost on the way, so the first field is a *header*
(shape (B, 3), int64): it says that the tuple is this library's, at which stage (the forward's
output, or :meth:`~mllm_metrics.hf.StreamingMetrics.preprocess_logits`' result), which fields
follow, the number of the evaluation the batch belongs to (see
:func:`~mllm_metrics.hf.expose_processed_labels`), and a checksum of the group names in their
order, which must be the same on every process (the group ids are positions in that list).

Every field is one row per sample: the header, ids and labels (B, L), the row NLL and group ids
(B,), and the generated and reference answers (B, N), -100 after each answer's end (the value
``Trainer`` pads with, so its padding and ours are one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mllm_metrics.functional import HF_IGNORE_INDEX

#: The value ``Trainer`` pads predictions and labels with, across processes and batches.
TRAINER_PAD_INDEX = HF_IGNORE_INDEX

_MAGIC = 0x6D6D4D  # "mmM": a header value no id, label or group position takes by chance
#: Stages of a batch's fields.
FORWARD, PREPROCESSED = 1, 2
#: Which optional fields follow the ids and labels.
HAS_NLL, HAS_GROUPS, HAS_GENERATION = 1, 2, 4
#: A flag: the forward ignored the label -100 only (it was exposed without ``metrics``).
IGNORES_ONLY_HF_INDEX = 8
#: The evaluation number when it is unknown (the model was not exposed with a forward of ours).
UNKNOWN_EVALUATION = -1


@dataclass(frozen=True)
class Header:
    """The header of a batch's fields."""

    stage: int
    nll: bool
    groups: bool
    generation: bool
    evaluation: int
    #: :func:`~mllm_metrics.grouped.groups_checksum` of the group names (0 without groups).
    groups_checksum: int = 0
    #: The forward ignored the label -100 only, not the metrics' own ``ignore_index``.
    ignores_only_hf_index: bool = False

    @property
    def size(self) -> int:
        """The number of fields, header included."""
        return 3 + self.nll + self.groups + 2 * self.generation

    def has(self, field: str) -> bool:
        """Whether the batch has the field of this name (see ``ChunkedEvalOutput.FIELDS``)."""
        optional = {
            "row_nll": self.nll,
            "group_ids": self.groups,
            "generated_ids": self.generation,
            "reference_ids": self.generation,
        }
        return optional.get(field, True)

    def tensor(self, rows: int, device: torch.device) -> Tensor:
        """The header field of a batch of ``rows`` rows."""
        flags = (
            HAS_NLL * self.nll
            + HAS_GROUPS * self.groups
            + HAS_GENERATION * self.generation
            + IGNORES_ONLY_HF_INDEX * self.ignores_only_hf_index
        )
        value = (_MAGIC << 16) | (self.stage << 8) | flags
        row = [value, self.evaluation, self.groups_checksum]
        return torch.tensor(row, dtype=torch.long, device=device).expand(rows, 3).clone()


def read_header(value: object) -> Header | None:
    """The header of a batch's fields, or None when ``value`` is not one of ours.

    Raises:
        ValueError: when the rows come from processes that list different groups (or the same
            in another order): their group ids would mean different groups.

    """
    if (
        not isinstance(value, Tensor)
        or value.ndim != 2
        or value.shape[1] != 3
        or value.is_floating_point()
        or value.shape[0] == 0
    ):
        return None
    codes = value[:, 0]
    code = int(codes[0])
    if code >> 16 != _MAGIC or not bool((codes == code).all()):
        return None
    checksums = value[:, 2].unique().tolist()
    if len(checksums) > 1:
        raise ValueError(
            "The processes do not list the same groups in the same order (their checksums "
            f"differ: {checksums}): a group's position would mean another group on another "
            "process. Likely cause: `groups=list(set(names))` (each process has its own string "
            "hash seed); pass `sorted(set(names))` or a fixed list."
        )
    stage, flags = (code >> 8) & 0xFF, code & 0xFF
    return Header(
        stage=stage,
        nll=bool(flags & HAS_NLL),
        groups=bool(flags & HAS_GROUPS),
        generation=bool(flags & HAS_GENERATION),
        evaluation=int(value[:, 1].max()),
        groups_checksum=int(checksums[0]),
        ignores_only_hf_index=bool(flags & IGNORES_ONLY_HF_INDEX),
    )


def answers_tensor(
    answers: Sequence[Sequence[int] | None], device: torch.device, width: int | None = None
) -> Tensor:
    """Token-id answers as one (B, width) int64 tensor, -100 after each answer's end; a row of
    -100 stands for None (no answer)."""
    width = max([len(a) for a in answers if a is not None] + [width or 0, 1])
    field = torch.full((len(answers), width), TRAINER_PAD_INDEX, dtype=torch.long)
    for row, answer in enumerate(answers):
        if answer:
            field[row, : len(answer)] = torch.tensor(list(answer), dtype=torch.long)
    return field.to(device)


def answers_of(field: Tensor) -> list[list[int] | None]:
    """The answers of :func:`answers_tensor` (after ``Trainer``'s padding): None for a row of
    padding only."""
    answers: list[list[int] | None] = []
    for row in field.tolist():
        tokens = [token for token in row if token != TRAINER_PAD_INDEX]
        answers.append(tokens or None)
    return answers


def preprocessed_fields(
    preds: Tensor,
    target: Tensor,
    row_nll: Tensor | None = None,
    *,
    group: Tensor | None = None,
    generated: Sequence[Sequence[int] | None] | None = None,
    references: Sequence[Sequence[int] | None] | None = None,
) -> tuple[Tensor, ...]:
    """What :meth:`~mllm_metrics.hf.StreamingMetrics.preprocess_logits` returns, from values
    computed elsewhere: to call a ``StreamingMetrics`` outside ``Trainer``.

    Args:
        preds: shifted argmax ids (B, L).
        target: shifted labels (B, L).
        row_nll: each row's summed NLL (B,), for a ``StreamingMetrics(nll=True)``.
        group: each row's group position (B,), for one with groups.
        generated: each row's greedy answer (None for a row without one), with ``references``,
            for one with generation.
        references: each row's reference answer.

    Examples:
        >>> import torch
        >>> from mllm_metrics.hf import StreamingMetrics
        >>> ids, labels = torch.tensor([[5, 6], [7, 7]]), torch.tensor([[5, 6], [7, 8]])
        >>> StreamingMetrics(nll=False)(preprocessed_fields(ids, labels))
        {'bit_match': 0.75, 'exact_match': 0.5}

    """
    generation = generated is not None or references is not None
    header = Header(
        PREPROCESSED, row_nll is not None, group is not None, generation, UNKNOWN_EVALUATION
    )
    fields = [header.tensor(preds.shape[0], preds.device), preds, target]
    fields += [value for value in (row_nll, group) if value is not None]
    if generation:
        rows = preds.shape[0]
        fields.append(answers_tensor(generated or [None] * rows, preds.device))
        fields.append(answers_tensor(references or [None] * rows, preds.device))
    return tuple(fields)
