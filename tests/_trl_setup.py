"""Shared pieces of the TRL ``SFTTrainer`` tests (test_trl.py): nothing is downloaded.

- a tiny Llama built from its config and a word-level tokenizer built in memory;
- a pre-tokenized eval set (prompt tokens labelled -100, answers supervised) whose answers are
  mostly the model's own greedy tokens, so that bit-match and exact-match are neither 0 nor 1;
- an independent reference: the model's plain forward (``type(model).forward``, so TRL's fused
  head and mllm-metrics' forward are never involved) over batches padded as TRL's collator pads
  them, counted in plain Python;
- a spy recording every top-level model call, backbone forward and output-head call.
"""

from __future__ import annotations

import tempfile

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# `trl` and `datasets` (not in the dev extra) are imported where used: pytest's
# --doctest-modules imports this module in every environment.

VOCAB = 64
PAD, EOS = 0, 1
EVAL_BATCH_SIZE = 2
CHUNK = 4  # the `logits_chunk_size` of the tests


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: SFTTrainer needs one with a pad token."""
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def plain_logits(model, input_ids, attention_mask):
    """The model's full logits from its class forward: no fused head, no exposure wrapper."""
    return type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask).logits


@torch.no_grad()
def eval_rows(model, count: int = 7, seed: int = 0) -> list[dict]:
    """Pre-tokenized rows ``{"input_ids", "labels"}``: prompts of 2 to 5 tokens, answers of 1 to 6
    (eval batches of 2 then hold 7, 9, 5 and 1 supervised positions).

    The answers are the model's greedy tokens, one in three with its last token changed and one
    in three with its first (then the rest drift): bit-match and exact-match between 0 and 1.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        prompt = torch.randint(2, VOCAB, (2 + i % 4,), generator=generator).tolist()
        answer: list[int] = []
        for _ in range(1 + (i * 5) % 6):
            ids = torch.tensor([prompt + answer])
            answer.append(int(plain_logits(model, ids, torch.ones_like(ids))[0, -1].argmax()))
        position = {1: -1, 2: 0}.get(i % 3)
        if position is not None:
            answer[position] = 2 + (answer[position] - 1) % (VOCAB - 2)
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def pad_batch(rows: list[dict]) -> dict:
    """Right padding, as TRL's collator pads: pad id 0, label -100, attention mask 0."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), PAD),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(row["labels"])
    return batch


def batches(rows: list[dict]) -> list[dict]:
    return [
        pad_batch(rows[start : start + EVAL_BATCH_SIZE])
        for start in range(0, len(rows), EVAL_BATCH_SIZE)
    ]


def supervised_per_batch(rows: list[dict]) -> list[int]:
    """The supervised (shifted) positions of each eval batch: what our head may see."""
    return [int((batch["labels"][:, 1:] != -100).sum()) for batch in batches(rows)]


def positions_per_batch(rows: list[dict]) -> list[int]:
    """B * L of each eval batch: what a full-logits forward gives the head."""
    return [batch["input_ids"].numel() for batch in batches(rows)]


@torch.no_grad()
def reference(model, rows: list[dict]) -> dict:
    """Counts over the eval set, batch by batch as the trainer forms them, in plain Python."""
    correct = supervised = hits = counted = 0
    nll_sum = 0.0
    for batch in batches(rows):
        logits = plain_logits(model, batch["input_ids"], batch["attention_mask"]).double()
        log_probs = torch.log_softmax(logits, dim=-1)
        for row_logits, row_log_probs, labels in zip(logits, log_probs, batch["labels"].tolist()):
            preds = row_logits.argmax(-1).tolist()
            row_hits = row_supervised = 0
            for t in range(len(labels) - 1):  # position t predicts label t + 1
                label = labels[t + 1]
                if label == -100:
                    continue
                row_supervised += 1
                row_hits += preds[t] == label
                nll_sum -= float(row_log_probs[t, label])
            correct += row_hits
            supervised += row_supervised
            if row_supervised:
                counted += 1
                hits += row_hits == row_supervised
    assert 0 < correct < supervised and 0 < hits < counted, "degenerate eval set"
    return {
        "bit_match": correct / supervised,
        "exact_match": hits / counted,
        "nll": nll_sum / supervised,
        "correct_tokens": correct,
        "supervised_tokens": supervised,
        "rows": len(rows),
    }


def sft_trainer(model, rows, train_rows=None, streaming=None, compute_metrics=None, **arguments):
    """An SFTTrainer on CPU in float32 (SFTConfig's bf16 defaults to True), eval batches of 2.

    ``streaming`` is passed as ``compute_metrics`` with its ``preprocess_logits``.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = {
        "output_dir": tempfile.mkdtemp(prefix="test_trl_"),
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "per_device_eval_batch_size": EVAL_BATCH_SIZE,
        "batch_eval_metrics": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        **arguments,
    }
    if streaming is not None:
        compute_metrics = streaming
    return SFTTrainer(
        model=model,
        args=SFTConfig(**config),
        train_dataset=Dataset.from_list(train_rows or rows),  # required by SFTTrainer
        eval_dataset=Dataset.from_list(rows),
        processing_class=tokenizer(),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=None if streaming is None else streaming.preprocess_logits,
    )


class Spy:
    """Records, in order, the model's top-level calls, its backbone forwards and the positions
    given to its output head module; ``tensors`` holds, at the same index, the call's labels,
    the backbone's last hidden states or the head's input.

    TRL's fused head multiplies by ``lm_head.weight`` directly (TRL internals): the head
    module's hooks do not fire for it, so every head call seen here is mllm-metrics' chunked
    head or a plain forward's full head.
    """

    def __init__(self, model) -> None:
        self.events: list[tuple] = []
        self.tensors: list = []
        self.handles = [
            model.register_forward_pre_hook(self._call, with_kwargs=True),
            model.base_model.register_forward_hook(self._backbone),
            model.get_output_embeddings().register_forward_hook(self._head),
        ]

    def _record(self, event: tuple, tensor) -> None:
        self.events.append(event)
        self.tensors.append(tensor)

    def _call(self, module, args, kwargs) -> None:
        labels = kwargs.get("labels")
        fused = bool(kwargs.get("fused_lm_head"))
        self._record(("call", fused, labels is not None, kwargs["input_ids"].numel()), labels)

    def _backbone(self, module, args, output) -> None:
        self._record(("backbone",), output[0].detach())

    def _head(self, module, args, output) -> None:
        self._record(("head", args[0].shape[:-1].numel()), args[0].detach())

    def per_batch(self) -> list[list[int]]:
        """The indices of the events, split at each top-level call with labels (TRL's fused
        call, the first of each eval batch)."""
        split: list[list[int]] = []
        for index, event in enumerate(self.events):
            if event[0] == "call" and event[2]:
                split.append([])
            assert split, f"an event before the first labelled call: {event}"
            split[-1].append(index)
        return split

    def events_per_batch(self) -> list[list[tuple]]:
        return [[self.events[i] for i in batch] for batch in self.per_batch()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
