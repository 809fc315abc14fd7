"""StreamingMetrics' per-sample records and text metrics against brute-force references."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from _hf_setup import (  # noqa: E402
    HAS_BATCH_EVAL_METRICS,
    SpellTokenizer,
    collate_llava_style,
    llava_style_rows,
    make_trainer,
    per_sample_reference,
    tiny_llava,
)

from mllm_metrics.hf import StreamingMetrics, expose_processed_labels  # noqa: E402
from mllm_metrics.hf.fields import preprocessed_fields  # noqa: E402


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_records_equal(records, expected, nll_rel=1e-6):
    """Counts, flags and strings exactly, all of them first; then each row's NLL to float32
    rounding (the library sums float32 cross-entropies, the reference float64 log-softmax)."""
    assert [r["index"] for r in records] == list(range(len(expected)))
    for record, reference in zip(records, expected, strict=True):
        assert {k: v for k, v in record.items() if k not in ("index", "nll")} == {
            k: v for k, v in reference.items() if k != "nll"
        }
    for record, reference in zip(records, expected, strict=True):
        assert record["nll"] == pytest.approx(reference["nll"], rel=nll_rel, abs=1e-6)


def text_reference(samples):
    """Text bit-match and exact-match of the decoded spans, character by character."""
    correct = total = equal = counted = 0
    for sample in samples:
        if sample["exact"] is None:  # no supervised label: skipped, as in exact-match
            continue
        predicted, expected = sample["prediction"], sample["reference"]
        correct += sum(a == b for a, b in zip(predicted, expected))
        total += max(len(predicted), len(expected))
        equal += predicted == expected
        counted += 1
    return correct / total, equal / counted


@pytest.fixture(scope="module")
def eval_set():
    model = tiny_llava()
    rows = llava_style_rows(model, 7, seed=1)
    return model, rows, per_sample_reference(model, rows)


@pytest.mark.parametrize("chunk", [None, 3], ids=["logits", "chunked"])
@pytest.mark.parametrize("batch_eval_metrics", [False, True], ids=["one-call", "per-batch"])
def test_evaluate_writes_the_records_of_every_sample(eval_set, tmp_path, batch_eval_metrics, chunk):
    if batch_eval_metrics and not HAS_BATCH_EVAL_METRICS:
        pytest.skip("this transformers release has no `batch_eval_metrics`")
    model, rows, expected = eval_set
    assert any(s["exact"] is None for s in expected)  # a row truncated down to its prompt
    assert {True, False} <= {s["exact"] for s in expected}
    streaming = StreamingMetrics(records_dir=tmp_path / "records", tokenizer=SpellTokenizer())
    with expose_processed_labels(model, logits_chunk_size=chunk):
        trainer = make_trainer(
            model, rows, collate_llava_style, streaming, tmp_path, batch_eval_metrics
        )
        results = trainer.evaluate()
        trainer.evaluate(metric_key_prefix="dev")
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [
        "dev_step0000000.jsonl",
        "eval_step0000000.jsonl",
    ]
    for name in ("dev_step0000000.jsonl", "eval_step0000000.jsonl"):
        assert_records_equal(_read(tmp_path / "records" / name), expected)
    text_bit_match, text_exact_match = text_reference(expected)
    assert results["eval_text_bit_match"] == pytest.approx(text_bit_match, rel=1e-6)
    assert results["eval_text_exact_match"] == pytest.approx(text_exact_match, rel=1e-6)


def test_the_file_is_named_after_the_global_step(eval_set, tmp_path):
    model, rows, _ = eval_set
    streaming = StreamingMetrics(records_dir=tmp_path / "records")
    with expose_processed_labels(model):
        trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, False)
        trainer.state.global_step = 40  # as after 40 optimizer steps
        trainer.evaluate()
    [path] = (tmp_path / "records").iterdir()
    assert path.name == "eval_step0000040.jsonl"
    assert all("prediction" not in record for record in _read(path))  # no tokenizer


def _batch(rows, generator):
    preds = torch.randint(5, (rows, 4), generator=generator)
    target = preds.clone()
    target[:, :2] = -100
    target[0, 3] = (target[0, 3] + 1) % 5
    row_nll = torch.rand(rows, generator=generator, dtype=torch.float64).float()
    return preprocessed_fields(preds, target, row_nll)


def test_outside_trainer_the_files_are_counted_and_a_bad_batch_records_nothing(tmp_path):
    generator = torch.Generator().manual_seed(0)
    streaming = StreamingMetrics(records_dir=tmp_path)
    first, second = _batch(2, generator), _batch(3, generator)
    streaming(first, compute_result=False)
    bad = (second[0], second[1][:, :2], *second[2:])  # preds that do not line up with labels
    with pytest.raises(ValueError):
        streaming([second, bad], compute_result=False)
    results = streaming(second, compute_result=True)
    streaming(first, compute_result=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval_call0000001.jsonl",
        "eval_call0000002.jsonl",
    ]
    records = _read(tmp_path / "eval_call0000001.jsonl")
    # Row 0 of each batch has one of its two supervised tokens wrong; the bad list added nothing.
    assert [r["correct_tokens"] for r in records] == [1, 2, 1, 2, 2]
    assert [r["exact"] for r in records] == [False, True, False, True, True]
    assert [r["nll"] for r in records] == pytest.approx(
        first[3].tolist() + second[3].tolist(), rel=1e-6
    )
    assert results["bit_match"] == pytest.approx(8 / 10)
    assert len(_read(tmp_path / "eval_call0000002.jsonl")) == 2


def test_tokenizer_needs_batch_decode():
    with pytest.raises(TypeError, match="batch_decode"):
        StreamingMetrics(tokenizer=object())


def test_without_nll_the_records_hold_a_null_nll(tmp_path):
    streaming = StreamingMetrics(nll=False, records_dir=tmp_path)
    preds = torch.tensor([[5, 6], [7, 7]])
    target = torch.tensor([[5, 6], [-100, 8]])
    streaming(preprocessed_fields(preds, target), compute_result=True)
    records = _read(tmp_path / "eval_call0000001.jsonl")
    assert [(r["correct_tokens"], r["supervised_tokens"], r["nll"]) for r in records] == [
        (2, 2, None),
        (0, 1, None),
    ]
