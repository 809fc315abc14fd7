"""A tiny, randomly initialised LLaVA-style causal LM whose ``forward`` rewrites the labels.

It reproduces the part of the LLaVA family that matters for metrics: inside ``forward``,
``prepare_inputs_labels_for_multimodal`` replaces every image placeholder (``-200``) by the
image's feature positions (labelled ``-100``), removes and re-applies padding and truncates
rows, so the logits are ``(B, L', V)`` while the data set's labels are ``(B, L)``.

Image convention: ``images`` is one tensor of shape ``(num_images, C, H, W)`` for the whole
batch. Placeholders are read in reading order (row 0 left to right, then row 1, ...), skipping
padded positions, and the k-th placeholder consumes ``images[k]``. Rows without a placeholder
consume no image; the number of images must equal the number of placeholders.

Works with ``transformers`` 4.37 (LLaVA's pin) and 5.x.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "TINY_DEFAULTS",
    "TinyLlavaConfig",
    "TinyLlavaForCausalLM",
    "make_multimodal_batch",
    "tiny_llava_config",
]


#: The language-model fields :class:`TinyLlavaConfig` changes from ``LlamaConfig``'s defaults
#: (a 7B-sized Llama): a model built from ``TinyLlavaConfig()`` has about 26 thousand parameters.
#: ``num_key_value_heads`` follows ``num_attention_heads``, as in ``LlamaConfig``.
TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


class TinyLlavaConfig(LlamaConfig):
    """Llama config plus the vision and tokenizer fields a LLaVA-style model reads; tiny by default.

    Without arguments it describes a very small model (nothing is downloaded): vocabulary 64,
    hidden size 32, 2 layers, 2 heads, intermediate size 64, at most 256 positions, 8x8
    single-channel images in 4x4 patches (4 feature positions per image), pad id 0, BOS 1,
    EOS 2 (:data:`TINY_DEFAULTS`; key/value heads default to the attention heads). Any field
    can be overridden, as with ``LlamaConfig``.

    Args:
        image_size: Height and width of the (square) input images.
        patch_size: Side of the square patches; each image gives
            ``(image_size // patch_size) ** 2`` feature positions.
        num_channels: Channels of the input images.
        image_token_index: Placeholder id in ``input_ids`` that stands for one image.
        tokenizer_model_max_length: Processed rows are truncated to this length (keeping the
            start); ``None`` disables truncation.
        tokenizer_padding_side: Side (``"right"`` or ``"left"``) on which processed rows are
            re-padded.
        **kwargs: Forwarded to :class:`~transformers.LlamaConfig`, over :data:`TINY_DEFAULTS`.

    Examples:
        >>> cfg = TinyLlavaConfig()
        >>> cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        (32, 2, 64)
        >>> TinyLlavaConfig(hidden_size=64, num_attention_heads=4).head_dim
        16
    """

    model_type = "tiny_llava"

    # An explicit ``__init__`` (rather than transformers 5 dataclass fields) is the form both
    # transformers 4.x and 5.x accept for a config subclass.
    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 4,
        num_channels: int = 1,
        image_token_index: int = IMAGE_TOKEN_INDEX,
        tokenizer_model_max_length: int | None = None,
        tokenizer_padding_side: str = "right",
        **kwargs: Any,
    ) -> None:
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.image_token_index = image_token_index
        self.tokenizer_model_max_length = tokenizer_model_max_length
        self.tokenizer_padding_side = tokenizer_padding_side
        super().__init__(**{**TINY_DEFAULTS, **kwargs})


def tiny_llava_config(**overrides: Any) -> TinyLlavaConfig:
    """Return a very small :class:`TinyLlavaConfig`: the same as ``TinyLlavaConfig(**overrides)``.

    Args:
        **overrides: Any :class:`TinyLlavaConfig` / ``LlamaConfig`` field.

    Returns:
        The config.

    Examples:
        >>> cfg = tiny_llava_config(tokenizer_padding_side="left")
        >>> cfg.hidden_size, cfg.vocab_size, cfg.tokenizer_padding_side
        (32, 64, 'left')
    """
    return TinyLlavaConfig(**overrides)


class TinyLlavaForCausalLM(LlamaForCausalLM):
    """A ``LlamaForCausalLM`` with a patchify-and-project vision encoder, LLaVA style.

    The vision encoder is a ``Conv2d`` with ``kernel_size = stride = patch_size`` (one vector per
    patch, patches in row-major order) followed by a ``Linear`` projector to the hidden size.
    See the module docstring for the image convention.

    Args:
        config: The model config.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model = TinyLlavaForCausalLM(tiny_llava_config()).eval()
        >>> batch = make_multimodal_batch([[1, -200, 5], [1, 7]], [[9, 2], [8, 8, 2]],
        ...                               images=torch.rand(1, 1, 8, 8))
        >>> batch["input_ids"].shape
        torch.Size([2, 5])
        >>> model(**batch).logits.shape  # row 0: 5 - 1 placeholder + 4 image positions
        torch.Size([2, 8, 64])
    """

    config_class = TinyLlavaConfig

    def __init__(self, config: TinyLlavaConfig) -> None:
        super().__init__(config)
        if config.image_size % config.patch_size:
            raise ValueError(
                f"image_size ({config.image_size}) must be a multiple of patch_size "
                f"({config.patch_size})."
            )
        self.vision_tower = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
        )
        self.mm_projector = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    @property
    def num_image_positions(self) -> int:
        """Number of feature positions ``N`` one image becomes."""
        return (self.config.image_size // self.config.patch_size) ** 2

    def encode_images(self, images: Tensor) -> Tensor:
        """Encode a batch of images into feature positions.

        Args:
            images: ``(num_images, num_channels, image_size, image_size)`` tensor.

        Returns:
            ``(num_images, N, hidden_size)`` features, patches in row-major order.
        """
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if (
            not isinstance(images, Tensor)
            or images.ndim != 4
            or tuple(images.shape[1:]) != expected
        ):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"`images` must be one tensor of shape (num_images, C, H, W) = (num_images, "
                f"{', '.join(map(str, expected))}) for the whole batch, got {got}."
            )
        weight = self.vision_tower.weight
        patches = self.vision_tower(images.to(device=weight.device, dtype=weight.dtype))
        return self.mm_projector(patches.flatten(2).transpose(1, 2))

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
        past_key_values: Any,
        labels: Tensor | None,
        images: Tensor | None,
        image_sizes: Any = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Any, Tensor | None, Tensor | None]:
        """Splice image features into the embedded rows and rewrite labels, mask and positions.

        Each row is compacted by its attention mask; each placeholder is replaced by the N
        feature positions of its image (label ``-100``); text tokens keep their labels; rows are
        truncated to ``config.tokenizer_model_max_length`` and re-padded to the longest row on
        ``config.tokenizer_padding_side`` (zero embeddings, label ``-100``, mask 0, position 0).

        Args:
            input_ids: ``(B, L)`` token ids with ``config.image_token_index`` placeholders.
            position_ids: ``(B, L)`` or ``None``; only its presence and dtype are used.
            attention_mask: ``(B, L)`` or ``None`` (treated as all ones).
            past_key_values: Passed through unchanged.
            labels: ``(B, L)`` or ``None``.
            images: ``(num_images, C, H, W)`` tensor, or ``None`` for a text-only call.
            image_sizes: Accepted for LLaVA API compatibility; unused.

        Returns:
            ``(None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)``
            with ``(B, L')`` tensors and ``inputs_embeds`` of shape ``(B, L', hidden_size)``;
            each of ``position_ids``, ``attention_mask`` and ``labels`` is ``None`` if it came
            in as ``None``. With ``images=None`` or a one-token step during generation, the
            inputs are returned unchanged with ``inputs_embeds=None``.

        Raises:
            ValueError: If the number of images differs from the number of placeholders, or
                the padding side is unknown.
        """
        if images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels

        cfg = self.config
        if cfg.tokenizer_padding_side not in ("right", "left"):
            raise ValueError(
                f"config.tokenizer_padding_side must be 'right' or 'left', "
                f"got {cfg.tokenizer_padding_side!r}."
            )
        keep = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        features = self.encode_images(images)  # validates `images` first
        is_image = (input_ids == cfg.image_token_index) & keep
        n_placeholders = int(is_image.sum())
        if n_placeholders != features.shape[0]:
            raise ValueError(
                f"Got {features.shape[0]} image(s) for {n_placeholders} placeholder(s) "
                f"(id {cfg.image_token_index}) in the unpadded part of `input_ids`. The k-th "
                "placeholder in reading order over the whole batch consumes images[k], and rows "
                "without a placeholder consume none: pass exactly one image per placeholder."
            )
        embed = self.get_input_embeddings()
        # Labels are built even when `labels` is None: it keeps one code path, and is dropped.
        in_labels = labels if labels is not None else torch.full_like(input_ids, IGNORE_INDEX)

        rows_e: list[Tensor] = []
        rows_l: list[Tensor] = []
        next_image = 0
        for ids, lab, row_keep, row_img in zip(input_ids, in_labels, keep, is_image, strict=True):
            ids, lab, row_img = ids[row_keep], lab[row_keep], row_img[row_keep]
            text_embeds = embed(ids[~row_img])
            # The k-th placeholder sits after (its position - k) text tokens: cut the text there.
            img_pos = torch.nonzero(row_img).flatten()
            cuts = (img_pos - torch.arange(len(img_pos), device=ids.device)).tolist()
            pieces_e, pieces_l, start = [], [], 0
            text_labels = lab[~row_img]
            for cut in cuts:
                pieces_e += [text_embeds[start:cut], features[next_image].to(text_embeds.dtype)]
                pieces_l += [
                    text_labels[start:cut],
                    text_labels.new_full((features.shape[1],), IGNORE_INDEX),
                ]
                start, next_image = cut, next_image + 1
            pieces_e.append(text_embeds[start:])
            pieces_l.append(text_labels[start:])
            row_e, row_l = torch.cat(pieces_e), torch.cat(pieces_l)
            if cfg.tokenizer_model_max_length is not None:
                row_e = row_e[: cfg.tokenizer_model_max_length]
                row_l = row_l[: cfg.tokenizer_model_max_length]
            rows_e.append(row_e)
            rows_l.append(row_l)

        batch, width = len(rows_e), max(len(r) for r in rows_e)
        out_embeds = rows_e[0].new_zeros((batch, width, rows_e[0].shape[-1]))
        out_labels = in_labels.new_full((batch, width), IGNORE_INDEX)
        mask_dtype = attention_mask.dtype if attention_mask is not None else torch.bool
        out_mask = torch.zeros((batch, width), dtype=mask_dtype, device=input_ids.device)
        pos_dtype = position_ids.dtype if position_ids is not None else torch.long
        out_pos = torch.zeros((batch, width), dtype=pos_dtype, device=input_ids.device)
        for i, (row_e, row_l) in enumerate(zip(rows_e, rows_l, strict=True)):
            n = len(row_e)
            span = slice(0, n) if cfg.tokenizer_padding_side == "right" else slice(width - n, width)
            out_embeds[i, span] = row_e
            out_labels[i, span] = row_l
            out_mask[i, span] = 1
            out_pos[i, span] = torch.arange(n, dtype=pos_dtype, device=input_ids.device)

        return (
            None,
            out_pos if position_ids is not None else None,
            out_mask if attention_mask is not None else None,
            past_key_values,
            out_embeds,
            out_labels if labels is not None else None,
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        images: Tensor | None = None,
        image_sizes: Any = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the causal LM on text and images; the loss uses the processed labels.

        Args:
            input_ids: ``(B, L)`` token ids with image placeholders.
            attention_mask: ``(B, L)`` or ``None``.
            position_ids: ``(B, L)`` or ``None``.
            past_key_values: KV cache (passed on only when not ``None``; transformers 5
                calls it ``cache``, which arrives through ``**kwargs``).
            inputs_embeds: Precomputed embeddings; when given, no multimodal processing runs.
            labels: ``(B, L)`` labels with ``-100`` on unsupervised positions, or ``None``.
            images: ``(num_images, C, H, W)``, see the module docstring.
            image_sizes: Accepted for LLaVA API compatibility; unused.
            return_dict: Passed on to ``LlamaForCausalLM.forward`` when not ``None``.
            **kwargs: Passed on to ``LlamaForCausalLM.forward`` (``use_cache``,
                ``logits_to_keep``, ``num_items_in_batch``...).

        Returns:
            ``LlamaForCausalLM``'s output: ``logits`` of shape ``(B, L', V)`` and, when labels
            are given, the standard shifted cross-entropy ``loss`` over the processed labels.
            The processed labels themselves are not returned.
        """
        if inputs_embeds is None:
            (
                input_ids,
                position_ids,
                attention_mask,
                past_key_values,
                inputs_embeds,
                labels,
            ) = self.prepare_inputs_labels_for_multimodal(
                input_ids,
                position_ids,
                attention_mask,
                past_key_values,
                labels,
                images,
                image_sizes,
            )
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        if return_dict is not None:
            kwargs["return_dict"] = return_dict
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )


def make_multimodal_batch(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    images: Tensor | None = None,
    *,
    pad_token_id: int = 0,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Collate data-set style rows (prompt + answer) into a batch for :class:`TinyLlavaForCausalLM`.

    Each row is ``prompt + answer``; the prompt (placeholders included) is labelled ``-100`` and
    the answer tokens are supervised. Rows are padded to the longest one with ``pad_token_id``
    (label ``-100``, mask 0).

    Args:
        prompts: Per-row prompt ids, with ``-200`` where an image goes.
        answers: Per-row answer ids (supervised).
        images: ``(num_images, C, H, W)``, one per placeholder in reading order, or ``None``.
        pad_token_id: Id used on padded positions.
        padding_side: ``"right"`` (the data-set convention) or ``"left"``.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` as ``(B, L)`` int64 tensors, plus
        ``"images"`` when given, ready for ``model(**batch)``.

    Examples:
        >>> b = make_multimodal_batch([[1, -200], [1]], [[5, 2], [6]])
        >>> b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist()
        ([[1, -200, 5, 2], [1, 6, 0, 0]], [[-100, -100, 5, 2], [-100, 6, -100, -100]], \
[[1, 1, 1, 1], [1, 1, 0, 0]])
    """
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers.")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    rows = [
        (list(p) + list(a), [IGNORE_INDEX] * len(p) + list(a))
        for p, a in zip(prompts, answers, strict=True)
    ]
    width = max((len(ids) for ids, _ in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        labels[i, span] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if images is not None:
        batch["images"] = images
    return batch
