"""Shared pieces of the transformers.Trainer tests, and the torchrun worker of test_hf_ddp.py.

- tiny models with random weights (nothing downloaded) and eval sets whose answers are mostly
  the model's own greedy tokens, so bit-match and exact-match are neither 0 nor 1;
- raw-count metrics (a doubled count shows where a ratio would hide it);
- an independent reference: run the model batch by batch, rebuild the processed labels by hand,
  count in Python.

Run as a script under ``torchrun --nproc_per_node 2 _hf_setup.py OUT_DIR``: every rank runs
``Trainer.evaluate()`` on the same 7 samples and writes its results to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from _models import LLAVA_IMAGE_TOKEN, hf_llava_expands_inside
from _reference import brute_force_bit_match, brute_force_exact_match, processed_labels_by_hand
from torch import Tensor
from torch.utils.data import IterableDataset
from torchmetrics import Metric
from transformers import Trainer, TrainingArguments

from mllm_metrics import BitMatchAccuracy, ExactMatchAccuracy, MllmMetricsWarning
from mllm_metrics.demo import TinyLlavaForCausalLM, make_multimodal_batch, tiny_llava_config
from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

HAS_BATCH_EVAL_METRICS = "batch_eval_metrics" in inspect.signature(TrainingArguments).parameters
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# `tokenizer_model_max_length` of the tiny LLaVA-style model: rows with a long prompt lose
# supervised answer tokens inside forward, and one row loses all of them.
MAX_LENGTH = 9


# ---- raw counts: each metric has its own state name (MetricCollection compute groups) ----------


class SupervisedTokens(Metric):
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("supervised_tokens", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.supervised_tokens += (target != -100).sum()

    def compute(self) -> Tensor:
        return self.supervised_tokens


class CorrectTokens(Metric):
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct_tokens", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.correct_tokens += ((preds == target) & (target != -100)).sum()

    def compute(self) -> Tensor:
        return self.correct_tokens


class Rows(Metric):
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("rows", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.rows += target.shape[0]

    def compute(self) -> Tensor:
        return self.rows


def counting_metrics() -> dict[str, Metric]:
    """Default-constructed metrics (sync_on_compute=True): StreamingMetrics must neutralise it."""
    return {
        "bit_match": BitMatchAccuracy(),
        "exact_match": ExactMatchAccuracy(),
        "supervised_tokens": SupervisedTokens(),
        "correct_tokens": CorrectTokens(),
        "rows": Rows(),
    }


# ---- the tiny LLaVA-style model (labels rewritten inside forward) --------------------------------


def tiny_llava(**overrides) -> TinyLlavaForCausalLM:
    torch.manual_seed(0)
    overrides.setdefault("tokenizer_model_max_length", MAX_LENGTH)
    return TinyLlavaForCausalLM(tiny_llava_config(**overrides)).eval()


def collate_llava_style(rows: list[dict]) -> dict[str, Tensor]:
    images = [row["image"] for row in rows if "image" in row]
    return make_multimodal_batch(
        [row["prompt"] for row in rows],
        [row["answer"] for row in rows],
        torch.cat(images) if images else None,
    )


@torch.no_grad()
def _greedy(next_logits, prefix: list[int], length: int, banned: tuple[int, ...]) -> list[int]:
    answer: list[int] = []
    for _ in range(length):
        logits = next_logits(prefix + answer).double()
        logits[list(banned)] = -torch.inf
        answer.append(int(logits.argmax()))
    return answer


def _corrupt(answer: list[int], row: int, vocab: int) -> list[int]:
    """Make some answers differ from the greedy ones: bit-match < 1, exact-match < 1."""
    wrong = answer.copy()
    position = {1: -1, 2: 0}.get(row % 3)  # the last token, or the first (then the rest drift)
    if position is not None:
        wrong[position] = 3 + (wrong[position] - 2) % (vocab - 4)
    return wrong


def llava_style_rows(
    model: TinyLlavaForCausalLM, count: int, seed: int = 0, greedy: bool = True
) -> list[dict]:
    """Rows ``{"prompt", "answer", "image"}``: one image each, prompts of 2 to 6 tokens.

    The answers are the model's greedy tokens, some corrupted; random with ``greedy=False``.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab, max_length = model.config.vocab_size, model.config.tokenizer_model_max_length
    model.config.tokenizer_model_max_length = None  # greedy answers over the full sequence
    rows = []
    try:
        for i in range(count):
            image = torch.rand(1, 1, 8, 8, generator=generator)
            prompt = [1, -200] + torch.randint(3, vocab, (i % 5,), generator=generator).tolist()

            def next_logits(ids: list[int], image: Tensor = image) -> Tensor:
                batch = make_multimodal_batch([ids], [[]], image)
                return model(**batch).logits[0, -1]

            if not greedy:
                answer = torch.randint(3, vocab, (1 + i % 4,), generator=generator).tolist()
                rows.append({"prompt": prompt, "answer": answer, "image": image})
                continue
            answer = _greedy(next_logits, prompt, 1 + i % 4, banned=(0, 1, 2))
            rows.append({"prompt": prompt, "answer": _corrupt(answer, i, vocab), "image": image})
    finally:
        model.config.tokenizer_model_max_length = max_length
    return rows


# ---- a tiny Hugging Face LlavaForConditionalGeneration (labels already aligned) ------------------


def collate_hf_llava(rows: list[dict]) -> dict[str, Tensor]:
    width = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["labels"][i, :n] = torch.tensor(row["labels"])
        batch["attention_mask"][i, :n] = 1
    batch["pixel_values"] = torch.stack([row["pixel_values"] for row in rows])
    return batch


def hf_llava_rows(model, count: int, seed: int = 0) -> list[dict]:
    """Rows of input ids and labels with image tokens, and their pixels.

    In transformers 5 the processor expands `<image>` into 4 tokens (rows of several lengths);
    4.37's Llava takes one `<image>` token and expands it inside forward (rows of one length:
    its merge code does not handle right-padded rows).
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    inside = hf_llava_expands_inside()
    rows = []
    for i in range(count):
        pixels = torch.rand(3, 8, 8, generator=generator)
        text = torch.randint(3, 60, (1 if inside else i % 3,), generator=generator).tolist()
        prompt = [1] + [LLAVA_IMAGE_TOKEN] * (1 if inside else 4) + text

        def next_logits(ids: list[int], pixels: Tensor = pixels) -> Tensor:
            inputs = {"input_ids": torch.tensor([ids]), "pixel_values": pixels[None]}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            return model(**inputs).logits[0, -1]

        length = 3 if inside else 1 + i % 4
        answer = _greedy(next_logits, prompt, length, banned=(0, 1, 2, LLAVA_IMAGE_TOKEN))
        answer = _corrupt(answer, i, vocab - 1)
        rows.append(
            {
                "input_ids": prompt + answer,
                "labels": [-100] * len(prompt) + answer,
                "pixel_values": pixels,
            }
        )
    return rows


def hf_llava_labels_by_hand(model, batch: dict[str, Tensor]) -> Tensor:
    """The batch's labels, with each `<image>` token made 4 ignored positions in 4.37."""
    if not hf_llava_expands_inside():
        return batch["labels"]
    rows = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        row = []
        for token, label in zip(ids, labels):
            row += [-100] * 4 if token == LLAVA_IMAGE_TOKEN else [label]
        rows.append(row)
    return torch.tensor(rows)


# ---- the independent reference -------------------------------------------------------------------


@torch.no_grad()
def reference(
    model, rows: list[dict], batch_size: int, collate, aligned_labels, also_ignored=None
) -> dict:
    """Counts over the eval set, batch by batch as Trainer forms them, in plain Python;
    ``also_ignored``: a label ignored besides -100."""
    preds, targets, nll_sum = [], [], 0.0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        logits = model(**batch).logits.double()
        labels = aligned_labels(model, batch)
        assert labels.shape == logits.shape[:2]
        log_probs = torch.log_softmax(logits, dim=-1)
        for row_logits, row_log_probs, row_labels in zip(logits, log_probs, labels.tolist()):
            row_labels = [-100 if label == also_ignored else label for label in row_labels]
            preds.append(row_logits[:-1].argmax(-1).tolist())
            targets.append(row_labels[1:])
            for t, label in enumerate(row_labels[1:]):
                if label != -100:
                    nll_sum -= float(row_log_probs[t, label])
    correct, supervised = brute_force_bit_match(preds, targets, -100)
    hits, counted = brute_force_exact_match(preds, targets, -100)
    assert 0 < correct < supervised and 0 < hits < counted, "degenerate eval set"
    return {
        "bit_match": correct / supervised,
        "exact_match": hits / counted,
        "nll": nll_sum / supervised,
        "correct_tokens": correct,
        "supervised_tokens": supervised,
        "rows": len(rows),
    }


class SpellTokenizer:
    """Decodes ids as their numbers: an independent stand-in for a real tokenizer."""

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [" ".join(str(token) for token in sequence) for sequence in sequences]


@torch.no_grad()
def per_sample_reference(model, rows: list[dict], batch_size: int = 2) -> list[dict]:
    """Each sample's record fields (LLaVA-style model), brute force in plain Python."""
    samples = []
    for start in range(0, len(rows), batch_size):
        batch = collate_llava_style(rows[start : start + batch_size])
        logits = model(**batch).logits.double()
        labels = processed_labels_by_hand(model, batch)
        log_probs = torch.log_softmax(logits, dim=-1)
        for row_logits, row_log_probs, row_labels in zip(logits, log_probs, labels.tolist()):
            preds = row_logits[:-1].argmax(-1).tolist()
            pairs = [
                (p, t, t_) for t_, (p, t) in enumerate(zip(preds, row_labels[1:])) if t != -100
            ]
            samples.append(
                {
                    "supervised_tokens": len(pairs),
                    "correct_tokens": sum(p == t for p, t, _ in pairs),
                    "exact": all(p == t for p, t, _ in pairs) if pairs else None,
                    "nll": -sum(float(row_log_probs[j, t]) for _, t, j in pairs),
                    "prediction": " ".join(str(p) for p, _, _ in pairs),
                    "reference": " ".join(str(t) for _, t, _ in pairs),
                }
            )
    return samples


def llava_style_reference(model, rows: list[dict], batch_size: int, also_ignored=None) -> dict:
    return reference(
        model, rows, batch_size, collate_llava_style, processed_labels_by_hand, also_ignored
    )


def hf_llava_reference(model, rows: list[dict], batch_size: int) -> dict:
    return reference(model, rows, batch_size, collate_hf_llava, hf_llava_labels_by_hand)


# ---- Trainer ------------------------------------------------------------------------------------


def make_trainer(
    model, rows, collate, streaming, output_dir, batch_eval_metrics: bool, **arguments
) -> Trainer:
    arguments = {
        "output_dir": str(output_dir),
        "per_device_eval_batch_size": 2,
        "report_to": [],
        "use_cpu": True,
        "remove_unused_columns": False,
        "disable_tqdm": True,
        **arguments,
    }
    if batch_eval_metrics:
        arguments["batch_eval_metrics"] = True
    return Trainer(
        model=model,
        args=TrainingArguments(**arguments),
        eval_dataset=rows,
        data_collator=collate,
        compute_metrics=streaming,
        preprocess_logits_for_metrics=streaming.preprocess_logits,
    )


def ddp_eval_set() -> tuple[TinyLlavaForCausalLM, list[dict]]:
    model = tiny_llava()
    return model, llava_style_rows(model, 7, seed=1)


class Interrupted(RuntimeError):
    pass


def _interrupted_evaluate(model, rows, streaming, output_dir) -> int:
    """Run a batch_eval_metrics evaluate() that raises on every rank at its third collate call
    (the first batch is counted; accelerate has fetched the second); return the rows left in
    the sums."""
    calls = []

    def collate(batch_rows):
        calls.append(len(batch_rows))
        if len(calls) == 3:
            raise Interrupted("interrupted on purpose")
        return collate_llava_style(batch_rows)

    trainer = make_trainer(
        model, rows, collate, streaming, output_dir, True, per_device_eval_batch_size=1
    )
    try:
        trainer.evaluate()
    except Interrupted:
        return int(streaming.metrics["rows"].rows)
    raise AssertionError("the evaluation was not interrupted")


class _Stream(IterableDataset):
    """The eval set as an iterable data set, without a length."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


class _SizedStream(_Stream):
    """The eval set as an iterable data set with a length."""

    def __len__(self) -> int:
        return len(self.rows)


def _gathered_repeats(model, rows: list[dict], output_dir: str) -> dict:
    """evaluate() over the eval set as an iterable each process reads (LLaVA's batches of
    varying length need ``dispatch_batches=False`` then), with and without a length, and as a
    map-style set with ``drop_last``: the results and our warnings of each."""
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    each_reads = (  # transformers before 4.38 took the accelerate option itself
        {"accelerator_config": {"dispatch_batches": False}}
        if "accelerator_config" in fields
        else {"dispatch_batches": False}
    )
    cases = {
        "iterable": (_Stream(rows), each_reads),
        "sized iterable": (_SizedStream(rows), each_reads),
        "map-style, drop_last": (rows, {"dataloader_drop_last": True}),
    }
    outcomes = {}
    for name, (eval_set, arguments) in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            streaming = StreamingMetrics(counting_metrics())
            trainer = make_trainer(
                model, eval_set, collate_llava_style, streaming, output_dir, False, **arguments
            )
            results = trainer.evaluate()
        ours = [str(w.message) for w in caught if issubclass(w.category, MllmMetricsWarning)]
        outcomes[name] = {"results": results, "warnings": ours}
    return outcomes


def _main(out_dir: str) -> None:
    torch.set_num_threads(1)
    model, rows = ddp_eval_set()
    expose_processed_labels(model)
    results = {}
    modes = [False, True] if HAS_BATCH_EVAL_METRICS else [False]
    with tempfile.TemporaryDirectory() as tmp:
        for batch_eval_metrics in modes:
            streaming = StreamingMetrics(counting_metrics())
            if HAS_BATCH_EVAL_METRICS:
                # An evaluate() that stops half-way leaves sums behind (one batch per rank):
                # the next evaluate() must start from zero all the same.
                results[f"interrupted_with={batch_eval_metrics}"] = _interrupted_evaluate(
                    model, rows, streaming, tmp
                )
            trainer = make_trainer(
                model, rows, collate_llava_style, streaming, tmp, batch_eval_metrics
            )
            results[f"batch_eval_metrics={batch_eval_metrics}"] = [
                trainer.evaluate(),
                trainer.evaluate(),
            ]
            # The same evaluation with the supervised-only chunked head instead of logits.
            with expose_processed_labels(model, logits_chunk_size=3):
                trainer = make_trainer(
                    model, rows, collate_llava_style, streaming, tmp, batch_eval_metrics
                )
                results[f"chunked:batch_eval_metrics={batch_eval_metrics}"] = trainer.evaluate()
            # Per-sample records and text metrics, written by process 0 only.
            records_dir = Path(out_dir, f"records_{batch_eval_metrics}")
            recording = StreamingMetrics(records_dir=records_dir, tokenizer=SpellTokenizer())
            trainer = make_trainer(
                model, rows, collate_llava_style, recording, tmp, batch_eval_metrics
            )
            results[f"records:batch_eval_metrics={batch_eval_metrics}"] = trainer.evaluate()
            results[f"records_kept:batch_eval_metrics={batch_eval_metrics}"] = (
                recording._records_kept_here()
            )
            results["world_size"] = trainer.args.world_size
            results["backend"] = torch.distributed.get_backend()
        results["gathered_repeats"] = _gathered_repeats(model, rows, tmp)
    rank = int(os.environ["RANK"])
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()


if __name__ == "__main__":
    _main(sys.argv[1])
