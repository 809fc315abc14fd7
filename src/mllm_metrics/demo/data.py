"""The demo's synthetic task: read the bits drawn in a small grayscale image.

Each sample is a square grid of black (0) and white (1) cells with Gaussian pixel noise; its
answer is the bit string of the first ``bits`` cells in reading order (row by row, left to
right), e.g. ``"0110..."``. When ``bits`` is not a square, the cells past the last bit are
mid-gray. Everything is generated from a seed; nothing is downloaded.

A row of the data set becomes ``<s> <image> bits:`` (the prompt, unsupervised) followed by
``0110...</s>`` (the answer, supervised), where ``<image>`` is the placeholder id ``-200``
that :class:`~mllm_metrics.demo.TinyLlavaForCausalLM` replaces by one feature position per
patch of cells inside its ``forward``. Each sample also belongs to one of two :data:`GROUPS`,
by how many of its bits are 1 (:func:`ones_group`), for the per-group metrics and records.
The text goes through a character-level tokenizer built with the ``tokenizers`` library and
wrapped as a ``transformers.PreTrainedTokenizerFast``, so the text metrics compare real
decoded strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from mllm_metrics.demo.model import IMAGE_TOKEN_INDEX, make_multimodal_batch

__all__ = [
    "ALPHABET",
    "GROUPS",
    "GROUP_KEY",
    "PROMPT",
    "SPECIAL_TOKENS",
    "BitImageCollator",
    "BitImageDataset",
    "StepSampler",
    "char_tokenizer",
    "decode_bit_images",
    "end_of_answer",
    "draw_bit_images",
    "grid_side",
    "ones_group",
]

#: Special tokens, with the ids :func:`~mllm_metrics.demo.tiny_llava_config` expects.
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
#: The characters the tokenizer knows (one token each).
ALPHABET = "01 abcdefghijklmnopqrstuvwxyz:?"
#: The text after the image placeholder in every prompt.
PROMPT = " bits:"
#: The groups of the samples: at most half of the answer's bits are 1, or more than half.
GROUPS: tuple[str, str] = ("few-ones", "many-ones")
#: The validation batches' key of the rows' groups (both back-ends).
GROUP_KEY = "group"
_GRAY = 0.5


def char_tokenizer() -> Any:
    """Build the character-level tokenizer of the demo (a ``PreTrainedTokenizerFast``).

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then one id per character of
    :data:`ALPHABET`. Every character is its own token (a ``Split`` pre-tokenizer), and the
    ``Fuse`` decoder joins tokens without spaces, so decoding gives back the text exactly.

    Returns:
        The tokenizer; ``len(tokenizer)`` is its vocabulary size.

    Examples:
        >>> tokenizer = char_tokenizer()
        >>> ids = tokenizer("0110", add_special_tokens=False)["input_ids"]
        >>> ids
        [4, 5, 5, 4]
        >>> tokenizer.batch_decode([ids + [tokenizer.eos_token_id]], skip_special_tokens=True)
        ['0110']
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIAL_TOKENS.values()) + list(ALPHABET)
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS
    )


def grid_side(bits: int, multiple: int = 1) -> int:
    """Cells per side of the smallest square grid that holds ``bits`` cells.

    Args:
        bits: number of bits (cells that carry one).
        multiple: round the side up to a multiple of this (e.g. the cells per model patch).

    Returns:
        The side, in cells.

    Examples:
        >>> grid_side(16), grid_side(12), grid_side(9), grid_side(9, multiple=2)
        (4, 4, 3, 4)
    """
    for name, value in (("bits", bits), ("multiple", multiple)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")
    side = math.isqrt(bits - 1) + 1
    return -(-side // multiple) * multiple


def end_of_answer(model: Any, tokenizer: Any) -> int | None:
    """The id that ends a generated answer: None (the model's own end-of-sequence id) when its
    config gives one, else the tokenizer's ``</s>``."""
    from mllm_metrics.generation import end_of_sequence_ids

    return None if end_of_sequence_ids(model, None) else tokenizer.eos_token_id


def ones_group(answer: str) -> str:
    """The group of an answer: ``"few-ones"`` when at most half of its bits are 1, else
    ``"many-ones"`` (see :data:`GROUPS`).

    Args:
        answer: the bit string, e.g. ``"0110"``.

    Returns:
        One of :data:`GROUPS`.

    Examples:
        >>> ones_group("0110"), ones_group("0111"), ones_group("0001")
        ('few-ones', 'many-ones', 'few-ones')
    """
    if not answer or set(answer) - {"0", "1"}:
        raise ValueError(f"Expected a non-empty string of 0s and 1s, got {answer!r}.")
    return GROUPS[0] if 2 * answer.count("1") <= len(answer) else GROUPS[1]


def draw_bit_images(
    bits: Tensor,
    cell_size: int,
    noise: float,
    generator: torch.Generator | None = None,
    side: int | None = None,
) -> Tensor:
    """Draw each row of ``bits`` as a grid of black/white cells with Gaussian pixel noise.

    Args:
        bits: ``(N, bits)`` tensor of 0/1.
        cell_size: side of one cell in pixels.
        noise: standard deviation of the pixel noise (values are clamped to [0, 1]).
        generator: random generator of the noise.
        side: cells per side; default :func:`grid_side` of ``bits.shape[1]``.

    Returns:
        ``(N, 1, side * cell_size, side * cell_size)`` float32 images; cells past the last bit
        are mid-gray.

    Examples:
        >>> draw_bit_images(torch.tensor([[1, 0, 0]]), cell_size=1, noise=0.0)
        tensor([[[[1.0000, 0.0000],
                  [0.0000, 0.5000]]]])
    """
    count, n_bits = bits.shape
    side = grid_side(n_bits) if side is None else side
    if side * side < n_bits:
        raise ValueError(f"A grid of {side}x{side} cells cannot hold {n_bits} bits.")
    cells = torch.full((count, side * side), _GRAY)
    cells[:, :n_bits] = bits.float()
    pixels = cells.view(count, 1, side, side)
    pixels = pixels.repeat_interleave(cell_size, dim=2).repeat_interleave(cell_size, dim=3)
    if noise:
        pixels = pixels + noise * torch.randn(pixels.shape, generator=generator)
    return pixels.clamp(0.0, 1.0)


def decode_bit_images(images: Tensor, bits: int, cell_size: int) -> Tensor:
    """Read the bits back from images by thresholding each cell's mean at 0.5.

    The inverse of :func:`draw_bit_images` for moderate noise: a check that the images really
    encode their answers.

    Args:
        images: ``(N, 1, H, W)`` images.
        bits: number of bits per image.
        cell_size: side of one cell in pixels.

    Returns:
        ``(N, bits)`` int64 tensor of 0/1.

    Examples:
        >>> images = draw_bit_images(torch.tensor([[0, 1, 1, 0, 1]]), cell_size=2, noise=0.0)
        >>> decode_bit_images(images, bits=5, cell_size=2)
        tensor([[0, 1, 1, 0, 1]])
    """
    means = torch.nn.functional.avg_pool2d(images, cell_size).flatten(1)
    return (means[:, :bits] > 0.5).long()


class BitImageDataset(Dataset):
    """A fixed, seeded set of bit images and their answers.

    Args:
        size: number of samples.
        bits: bits per image.
        seed: seed of the bits and of the noise; the same arguments give the same data.
        cell_size: side of one cell in pixels.
        noise: standard deviation of the pixel noise.
        side: cells per side of the grid; default :func:`grid_side` of ``bits``.

    Attributes:
        bits: ``(size, bits)`` int64 tensor of the answers' bits.
        images: ``(size, 1, H, W)`` images.

    A row is ``{"image": (1, H, W) tensor, "answer": "0110...", "group": "few-ones"}``, its
    group given by :func:`ones_group`.

    Examples:
        >>> data = BitImageDataset(3, bits=4, seed=0, cell_size=2)
        >>> len(data), data[0]["image"].shape, data[0]["answer"], data[0]["group"]
        (3, torch.Size([1, 4, 4]), '0110', 'few-ones')
    """

    def __init__(
        self,
        size: int,
        bits: int,
        seed: int,
        cell_size: int = 2,
        noise: float = 0.3,
        side: int | None = None,
    ) -> None:
        side = grid_side(bits) if side is None else side  # validates `bits`
        generator = torch.Generator().manual_seed(seed)
        self.bits = torch.randint(0, 2, (size, bits), generator=generator)
        self.images = draw_bit_images(self.bits, cell_size, noise, generator, side=side)
        self.cell_size = cell_size
        self.noise = noise

    @property
    def image_size(self) -> int:
        """Side of the images in pixels."""
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.bits.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        answer = "".join(map(str, self.bits[index].tolist()))
        return {"image": self.images[index], "answer": answer, "group": ones_group(answer)}


class BitImageCollator:
    """Turn data set rows into a batch for :class:`~mllm_metrics.demo.TinyLlavaForCausalLM`.

    Each row becomes ``<s> -200 " bits:"`` (labels -100) followed by the answer's characters and
    ``</s>`` (supervised), right-padded with ``<pad>``; ``images`` stacks one image per row.

    Args:
        tokenizer: the tokenizer of :func:`char_tokenizer`.
        group_key: also put the rows' groups (a list of str, see :data:`GROUPS`) in the batch
            under this key, for ``MultimodalLMModule(group_key=..., groups=GROUPS)``, which
            removes it before calling the model. None (the default) leaves them out:
            ``transformers.Trainer`` passes every key of the batch to the model's ``forward``.

    Examples:
        >>> collate = BitImageCollator(char_tokenizer())
        >>> batch = collate([BitImageDataset(1, bits=4, seed=0)[0]])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[1, -200, 6, 8, 15, 26, 25, 33, 4, 5, 5, 4, 2]], \
[[-100, -100, -100, -100, -100, -100, -100, -100, 4, 5, 5, 4, 2]])
        >>> batch["images"].shape
        torch.Size([1, 1, 4, 4])
        >>> collate = BitImageCollator(char_tokenizer(), group_key="group")
        >>> collate([BitImageDataset(2, bits=4, seed=0)[i] for i in range(2)])["group"]
        ['few-ones', 'many-ones']
    """

    def __init__(self, tokenizer: Any, group_key: str | None = None) -> None:
        if group_key is not None and (not isinstance(group_key, str) or not group_key):
            raise ValueError(
                f"Expected `group_key` to be a non-empty str or None, got {group_key!r}."
            )
        self.tokenizer = tokenizer
        self.group_key = group_key
        prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        self.prompt = [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX, *prompt]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        answers = self.tokenizer([row["answer"] for row in rows], add_special_tokens=False)
        batch = make_multimodal_batch(
            [self.prompt] * len(rows),
            [ids + [self.tokenizer.eos_token_id] for ids in answers["input_ids"]],
            torch.stack([row["image"] for row in rows]),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if self.group_key is not None:
            batch[self.group_key] = [row["group"] for row in rows]
        return batch


class StepSampler(DistributedSampler):
    """Deal each training step's rows into micro-batches, and the micro-batches to processes.

    Step ``k`` trains on the rows ``k * batch_size`` to ``(k + 1) * batch_size - 1``. Its
    micro-batch ``j`` (of ``micro_batches``) holds every ``micro_batches``-th of them, starting
    at the ``j``-th; process ``r`` of ``num_replicas`` takes the micro-batches ``r``,
    ``r + num_replicas``, ... in turn. Read in batches of ``batch_size // micro_batches``, one
    process and ``micro_batches`` processes see the same micro-batches.

    It is a ``DistributedSampler``, so Lightning uses it as it is (for training, Lightning
    would otherwise put in a shuffling one); nothing is shuffled, the rows are random already.
    The ``--backend hf`` run reads the training set in this order too.

    Args:
        dataset: the training set (rows past the last whole step are not used).
        batch_size: rows per step, over all processes.
        micro_batches: micro-batches per step, a multiple of ``num_replicas``.
        num_replicas: number of processes.
        rank: this process.

    Examples:
        >>> rows = list(range(8))
        >>> list(StepSampler(rows, batch_size=4, micro_batches=2))
        [0, 2, 1, 3, 4, 6, 5, 7]
        >>> list(StepSampler(rows, batch_size=4, micro_batches=2, num_replicas=2, rank=1))
        [1, 3, 5, 7]
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        micro_batches: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        if batch_size % micro_batches or micro_batches % num_replicas:
            raise ValueError(
                f"Expected `micro_batches` ({micro_batches}) to divide `batch_size` "
                f"({batch_size}) and to be a multiple of `num_replicas` ({num_replicas})."
            )
        self.batch_size, self.micro_batches = batch_size, micro_batches
        self.steps = len(dataset) // batch_size

    def __iter__(self) -> Iterator[int]:
        for start in range(0, self.steps * self.batch_size, self.batch_size):
            for part in range(self.rank, self.micro_batches, self.num_replicas):
                yield from range(start + part, start + self.batch_size, self.micro_batches)

    def __len__(self) -> int:
        return self.steps * self.batch_size // self.num_replicas
