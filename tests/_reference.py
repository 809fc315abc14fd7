"""Independent references for the metric tests: brute-force Python counts and input builders."""

from __future__ import annotations

import torch


def brute_force_bit_match(preds: list[list[int]], target: list[list[int]], ignore_index: int):
    correct = total = 0
    for pred_row, target_row in zip(preds, target, strict=True):
        for pred, label in zip(pred_row, target_row, strict=True):
            if label != ignore_index:
                total += 1
                correct += pred == label
    return correct, total


def brute_force_exact_match(preds: list[list[int]], target: list[list[int]], ignore_index: int):
    hits = counted = 0
    for pred_row, target_row in zip(preds, target, strict=True):
        pairs = [(p, t) for p, t in zip(pred_row, target_row, strict=True) if t != ignore_index]
        if pairs:
            counted += 1
            hits += all(p == t for p, t in pairs)
    return hits, counted


def make_token_batch(
    generator: torch.Generator,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    ignore_prob: float = 0.3,
    error_prob: float = 0.1,
    ignored_rows: int = 0,
    ignore_index: int = -100,
):
    """Labels with ignored positions and whole ignored rows, and ids that are mostly right."""
    target = torch.randint(vocab_size, (batch_size, seq_len), generator=generator)
    target[torch.rand(batch_size, seq_len, generator=generator) < ignore_prob] = ignore_index
    target[:ignored_rows] = ignore_index
    preds = torch.where(target == ignore_index, 0, target)
    wrong = torch.rand(batch_size, seq_len, generator=generator) < error_prob
    preds = torch.where(wrong, (preds + 1) % vocab_size, preds)
    # Rows entirely right make exact-match non-trivial.
    fully_right = torch.rand(batch_size, generator=generator) < 0.4
    preds[fully_right] = torch.where(target == ignore_index, 0, target)[fully_right]
    return preds, target


def logits_for(
    preds: torch.Tensor, vocab_size: int, generator: torch.Generator, dtype=torch.float32
):
    """Random logits whose argmax over the last dim is exactly ``preds``."""
    logits = torch.randn(*preds.shape, vocab_size, generator=generator)
    logits.scatter_(-1, preds.unsqueeze(-1), 10.0)
    return logits.to(dtype)
