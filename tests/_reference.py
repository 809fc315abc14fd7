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


def processed_labels_by_hand(model, batch, max_length=None, padding_side=None):
    """The labels a LLaVA-style forward aligns its logits with, built row by row.

    Truncation and padding side default to the model's config.
    """
    max_length = max_length or model.config.tokenizer_model_max_length
    padding_side = padding_side or model.config.tokenizer_padding_side
    n = model.num_image_positions
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        row = []
        for token, label, keep in zip(ids.tolist(), labels.tolist(), mask.tolist()):
            if keep:
                row += [-100] * n if token == -200 else [label]
        rows.append(row[:max_length])
    width = max(map(len, rows))
    pad = [[-100] * (width - len(row)) for row in rows]
    if padding_side == "right":
        return torch.tensor([row + p for row, p in zip(rows, pad)])
    return torch.tensor([p + row for row, p in zip(rows, pad)])


def favour_token(model, token: int = 5, bias: float = 0.27):
    """Give the output head a bias towards ``token``, so a random model predicts it about half
    the time: answers made of that token are then partly right, and the metrics non-trivial."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token] = bias
    model.set_output_embeddings(head)
    return model


def grouped_batches(groups, seed: int = 0, count: int = 3, as_positions: bool = False):
    """Pre-collated batches of 3 rows (0, 1 and 2 images), answers of 5s and 9s, each row in
    ``groups[0]`` or ``groups[1]``, alternating (by name, or by position with
    ``as_positions``)."""
    from mllm_metrics.demo import make_multimodal_batch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        prompts = [[1, -200, 7], [1, 8], [-200, 9, -200, 3]]
        answers = [
            torch.tensor([5, 5, 9])[torch.randint(3, (int(n),), generator=generator)].tolist()
            for n in torch.randint(1, 5, (3,), generator=generator)
        ]
        batch = make_multimodal_batch(prompts, answers, torch.rand(3, 1, 8, 8, generator=generator))
        names = [groups[(index + row) % 2] for row in range(3)]
        batch["task"] = torch.tensor([groups.index(n) for n in names]) if as_positions else names
        batches.append(batch)
    return batches
