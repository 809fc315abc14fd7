"""Free-running answers: greedy decoding from each row's prompt, next to teacher forcing.

Teacher-forced bit-match and exact-match predict every position from the *true* previous
tokens. What a fine-tuned model finally ships is its own greedy answer, where one early mistake
derails the rest. For a row with one answer span that ends with the end-of-sequence token, and
greedy decoding with enough new tokens, free-running exact-match *equals* teacher-forced
exact-match: if every answer token is the
argmax given the true prefix, greedy decoding reproduces the answer (and its end token), and
the first token that is not the argmax is also the first token greedy decoding gets wrong. What
generation adds is the answers themselves, partial credit after a derailment (free-running
bit-match lags teacher-forced bit-match) and multi-turn rows, where teacher-forced exact-match
needs every turn right and free-running judges the last answer.

Per row, from the batch as the data set gives it (before the model rewrites anything):

- the **reference** is the last maximal run of supervised labels (``labels != ignore_index``);
- the **prompt** is every real (attention-masked) token before it, image placeholders included;
- the **generated answer** is the greedy continuation of the prompt up to and including the
  first end-of-sequence token, or ``max_new_tokens`` tokens.

Decoding uses the model's own ``generate`` for Hugging Face models that have one and no label
rewriting of their own (``LlamaForCausalLM``, ``LlavaForConditionalGeneration``...); for
LLaVA-style models (``prepare_inputs_labels_for_multimodal``, whose ``generate`` is their own
code) and models without ``generate``, a KV-cached greedy loop over ``forward``: the prompt's
input embeddings (with the image features spliced in by the model's own method) are
left-aligned, then one token at a time is fed with its cache. Neither changes the model.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mllm_metrics._warning import MllmMetricsWarning
from mllm_metrics.functional import _hf_ignored
from mllm_metrics.labels import PREPARE_METHOD, _is_sharded_fsdp_root, run_in_root_forward

__all__ = [
    "GenerationPrompts",
    "answer_spans",
    "build_prompts",
    "end_of_sequence_ids",
    "greedy_answers",
]

# The batch keys of the prompt itself; every other tensor (images, pixel values...) is passed on.
_PROMPT_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


def answer_spans(labels: Tensor, ignore_index: int = -100) -> list[tuple[int, int] | None]:
    """Each row's last maximal run of supervised labels, as ``(start, end)``; None without one.

    Examples:
        >>> answer_spans(torch.tensor([[-100, 5, 6, -100, 7, 8], [-100, -100, -100, -100, -100, 1],
        ...                            [-100] * 6]))
        [(4, 6), (5, 6), None]

    """
    spans: list[tuple[int, int] | None] = []
    for row in (labels != ignore_index).tolist():
        if not any(row):
            spans.append(None)
            continue
        end = len(row) - row[::-1].index(True)
        start = end
        while start > 0 and row[start - 1]:
            start -= 1
        spans.append((start, end))
    return spans


@dataclass
class GenerationPrompts:
    """Left-padded prompts of a batch and each row's reference answer."""

    #: ``(B, P)`` prompt ids, left-padded.
    input_ids: Tensor
    #: ``(B, P)`` 1 on prompt tokens, 0 on padding.
    attention_mask: Tensor
    #: Each row's reference answer (token ids); None for a row without a supervised label.
    references: list[list[int] | None]


def build_prompts(
    batch: Mapping[str, Any], ignore_index: int = -100, pad_token_id: int = 0
) -> GenerationPrompts:
    """The prompts and reference answers of a data-set batch (see the module docstring).

    A row without a supervised label, or whose answer has nothing before it, keeps its whole
    text as the prompt (its image placeholders must still meet their images) and is not
    counted (its reference is None).

    Examples:
        >>> batch = {"input_ids": torch.tensor([[1, -200, 7, 8, 2, 0], [1, 9, 9, 6, 6, 2]]),
        ...          "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
        ...          "labels": torch.tensor([[-100, -100, -100, 8, 2, -100],
        ...                                  [-100, -100, -100, 6, 6, 2]])}
        >>> prompts = build_prompts(batch)
        >>> prompts.input_ids.tolist(), prompts.references
        ([[1, -200, 7], [1, 9, 9]], [[8, 2], [6, 6, 2]])

    """
    input_ids, labels = batch.get("input_ids"), batch.get("labels")
    if not isinstance(input_ids, Tensor) or not isinstance(labels, Tensor):
        raise ValueError(
            "Generating answers needs the batch's `input_ids` and `labels` (the reference answer "
            f"is the last run of supervised labels); the batch has keys {sorted(batch)}."
        )
    if input_ids.shape != labels.shape:
        raise ValueError(
            f"Generating answers needs the data set's `labels`, aligned with `input_ids`: got "
            f"shapes {tuple(labels.shape)} and {tuple(input_ids.shape)}."
        )
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    prompts, references = [], []
    for row, span in enumerate(answer_spans(_hf_ignored(labels, ignore_index), ignore_index)):
        if span is not None and not mask[row, : span[0]].any():
            span = None  # nothing to answer from: not counted, like a row without an answer
        end = input_ids.shape[1] if span is None else span[0]
        keep = mask[row, :end].bool()
        prompts.append(input_ids[row, :end][keep])
        references.append(None if span is None else labels[row, span[0] : span[1]].tolist())
    width = max((len(prompt) for prompt in prompts), default=0)
    ids = input_ids.new_full((len(prompts), width), pad_token_id)
    prompt_mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt) :] = prompt
            prompt_mask[row, width - len(prompt) :] = 1
    return GenerationPrompts(ids, prompt_mask, references)


def end_of_sequence_ids(model: nn.Module, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The ids that end a generated answer: ``eos_token_id`` when given, else the model's
    generation config's, else its config's; empty when none is known."""
    if eos_token_id is None:
        for holder in ("generation_config", "config"):
            eos_token_id = getattr(getattr(model, holder, None), "eos_token_id", None)
            if eos_token_id is not None:
                break
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return [int(i) for i in ids]


def _cut_at_end(tokens: list[int], end_ids: list[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in end_ids:
            return tokens[: position + 1]
    return tokens


def _extra_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in batch.items() if key not in _PROMPT_KEYS}


def _uses_own_loop(model: nn.Module) -> bool:
    return hasattr(model, PREPARE_METHOD) or not callable(getattr(model, "generate", None))


def greedy_answers(
    model: nn.Module,
    batch: Mapping[str, Any],
    prompts: GenerationPrompts,
    max_new_tokens: int,
    end_ids: Sequence[int],
    lockstep: bool = False,
) -> list[list[int]]:
    """Greedy answers of ``model`` to ``prompts``, each cut after its first end token.

    Args:
        model: the model, used as it is (evaluation mode is the caller's).
        batch: the data-set batch (its other inputs, e.g. ``images``, are passed on).
        prompts: from :func:`build_prompts`.
        max_new_tokens: the most tokens generated per row.
        end_ids: the end-of-sequence ids.
        lockstep: processes of a sharded model must call its forward the same number of
            times: the loop then decodes exactly ``max_new_tokens`` steps (no collective), and
            ``generate`` gets ``synced_gpus=True`` (transformers' own all-reduce at each step);
            otherwise decoding stops when every row has ended.

    Returns:
        One list of token ids per row.

    """
    if _uses_own_loop(model):
        tokens = _cached_greedy_loop(model, batch, prompts, max_new_tokens, end_ids, lockstep)
    else:
        tokens = _hf_generate(model, batch, prompts, max_new_tokens, end_ids, lockstep)
    return [_cut_at_end(row, list(end_ids)) for row in tokens.tolist()]


def _hf_generate(
    model: nn.Module,
    batch: Mapping[str, Any],
    prompts: GenerationPrompts,
    max_new_tokens: int,
    end_ids: Sequence[int],
    lockstep: bool,
) -> Tensor:
    from transformers import GenerationConfig

    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = end_ids[0] if end_ids else 0
    # Plain greedy decoding, whatever the model's own generation config says (sampling, beams,
    # repetition penalty): the answer teacher forcing is compared with.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        min_new_tokens=0,
        suppress_tokens=[],
        begin_suppress_tokens=[],
        eos_token_id=list(end_ids) or None,
        pad_token_id=pad,
    )
    _warn_about_constraints(model.generation_config)
    # transformers encodes the images before the first forward (outside any forward of the root):
    # an FSDP2 root's own parameters (the vision tower's, when they are in the root's unit) are
    # gathered for the whole call; the decoder layers gather theirs in their forwards.
    gather = _is_sharded_fsdp_root(model)
    if gather:
        model.unshard()
    try:
        with _without_length_clash_warnings():
            output = model.generate(
                input_ids=prompts.input_ids,
                attention_mask=prompts.attention_mask,
                generation_config=config,
                synced_gpus=lockstep,
                **_extra_inputs(batch),
            )
    finally:
        if gather:
            model.reshard()
    sequences = output if isinstance(output, Tensor) else output.sequences
    return sequences[:, prompts.input_ids.shape[1] :]


class _LengthClashFilter(logging.Filter):
    """Drops transformers' "Both `min_new_tokens` and `min_length` seem to have been set": the
    library sets both to neutral values itself (the model's generation config fills in what is
    left unset), so the message would only tell the user about the library's own arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "seem to have been set" not in record.getMessage()


@contextmanager
def _without_length_clash_warnings() -> Iterator[None]:
    logger = logging.getLogger("transformers.generation.utils")
    clash = _LengthClashFilter()
    logger.addFilter(clash)
    try:
        yield
    finally:
        logger.removeFilter(clash)


# Generation-config fields that constrain even greedy decoding and that transformers (5.x) fills
# in from the model's own generation config when the config passed to `generate` leaves them
# unset: they have no neutral value to pass instead.
_CONSTRAINTS = ("bad_words_ids", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id")
_warned_constraints: set[str] = set()


def _warn_about_constraints(generation_config: Any) -> None:
    found = [name for name in _CONSTRAINTS if getattr(generation_config, name, None) is not None]
    new = [name for name in found if name not in _warned_constraints]
    if new:
        _warned_constraints.update(new)
        warnings.warn(
            f"The model's generation config sets {', '.join(new)}, which `generate` applies to "
            "greedy decoding too: the gen_* metrics judge those constrained answers, and "
            "free-running exact-match may then differ from teacher-forced exact-match.",
            category=MllmMetricsWarning,
            stacklevel=3,
        )


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the ``forward`` that runs when the model is called takes the argument ``name``.

    Decided from the instance's class's own ``forward`` (LLaVA's takes explicit arguments and
    no ``**kwargs``, though its parent ``LlamaForCausalLM.forward`` takes ``logits_to_keep``);
    a parent class's ``forward`` counts only when every ``forward`` before it passes
    ``**kwargs`` on.
    """
    for cls in type(model).__mro__:
        forward = vars(cls).get("forward")
        if forward is None:
            continue
        parameters = inspect.signature(forward).parameters
        if name in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def _prepare_arguments(
    model: nn.Module, batch: Mapping[str, Any], ids: Tensor, mask: Tensor
) -> dict[str, Any]:
    """The keyword arguments of the model's prepare method for the prompts, by name (LLaVA-NeXT
    takes ``modalities`` before ``image_sizes``): the prompts' ids and mask, nothing cached, no
    labels, and every other argument it names from the batch."""
    parameters = inspect.signature(getattr(model, PREPARE_METHOD)).parameters
    extra = _extra_inputs(batch)
    arguments: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            continue
        if name == "input_ids":
            arguments[name] = ids
        elif name == "attention_mask":
            arguments[name] = mask
        elif name in ("position_ids", "past_key_values", "labels"):
            arguments[name] = None
        elif name in extra:
            arguments[name] = extra[name]
        elif parameter.default is parameter.empty:  # e.g. LLaVA's `images`, on a text-only batch
            arguments[name] = None
    return arguments


def _prompt_embeddings(
    model: nn.Module, batch: Mapping[str, Any], prompts: GenerationPrompts
) -> tuple[Tensor, Tensor]:
    """The prompts' input embeddings and attention mask, left-aligned; a LLaVA-style model
    splices its image features in with its own method (rows may grow, be re-padded, truncated)."""
    ids, mask = prompts.input_ids, prompts.attention_mask
    if hasattr(model, PREPARE_METHOD):
        prepared = getattr(model, PREPARE_METHOD)(**_prepare_arguments(model, batch, ids, mask))
        embeds, mask = prepared[4], prepared[2]
        if embeds is None:  # LLaVA passes text-only batches (no images) through as ids
            ids = prepared[0] if prepared[0] is not None else ids
            embeds = model.get_input_embeddings()(ids)
        if embeds.shape[0] != ids.shape[0]:
            raise ValueError(
                f"{type(model).__name__}.{PREPARE_METHOD} returned {embeds.shape[0]} rows for "
                f"{ids.shape[0]} prompts. Likely cause: LLaVA-NeXT's `modalities` defaults to "
                "['image'], one entry: give the batch `modalities` with one entry per row."
            )
        mask = (
            torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            if mask is None
            else mask
        )
    else:
        embeds = model.get_input_embeddings()(ids)
    # Left-align every row: new tokens are appended at the right end of all rows at once.
    mask = mask.long()
    order = torch.sort(mask, dim=1, stable=True).indices  # padding first, tokens in order
    embeds = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
    return embeds, mask.gather(1, order)


def _cache_of(outputs: Any) -> tuple[str, Any]:
    for name in ("cache", "past_key_values"):
        value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
        if value is not None:
            return name, value
    raise ValueError(
        f"{type(outputs).__name__} holds no KV cache (`cache` or `past_key_values`): generating "
        "answers with a model that has no `generate` needs a forward that returns its cache "
        "when called with `use_cache=True`."
    )


def _last_logits(outputs: Any) -> Tensor:
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
    return logits[:, -1]


def _cached_greedy_loop(
    model: nn.Module,
    batch: Mapping[str, Any],
    prompts: GenerationPrompts,
    max_new_tokens: int,
    end_ids: Sequence[int],
    lockstep: bool,
) -> Tensor:
    embeds, mask = run_in_root_forward(model, _prompt_embeddings, model, batch, prompts)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # transformers 5 returns the cache as `cache`, which LLaVA's explicit forward does not take:
    # it takes `past_key_values`. A forward that names neither gets the output's own name.
    cache_names = [name for name in ("cache", "past_key_values") if _accepts(model, name)]
    ends = torch.tensor(list(end_ids), dtype=torch.long, device=embeds.device)
    rows = embeds.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=embeds.device)
    generated: list[Tensor] = []
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    # The prompt once, as embeddings; then each new token as an id, embedded by the model's own
    # forward (nothing of the model is called outside a forward of its own: FSDP2 gathers its
    # parameters there).
    inputs: dict[str, Any] = {"inputs_embeds": embeds}
    for _ in range(max_new_tokens):
        outputs = model(
            **inputs, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last
        )
        token = _last_logits(outputs).argmax(dim=-1)
        generated.append(token)
        done |= torch.isin(token, ends)
        if not lockstep and bool(done.all()):
            break
        name, cache = _cache_of(outputs)
        inputs = {"input_ids": token.unsqueeze(1), (cache_names or [name])[0]: cache}
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
    if not generated:
        return torch.zeros(rows, 0, dtype=torch.long, device=embeds.device)
    return torch.stack(generated, dim=1)
