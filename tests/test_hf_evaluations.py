"""``StreamingMetrics`` under ``Trainer``: where an evaluation starts, and which labels count.

Every expected count is the brute-force reference of ``_hf_setup`` (plain Python over the
processed labels, rebuilt by hand).
"""

from __future__ import annotations

from collections import Counter

import pytest

pytest.importorskip("transformers")

from _hf_setup import (  # noqa: E402
    HAS_BATCH_EVAL_METRICS,
    _interrupted_evaluate,
    collate_llava_style,
    counting_metrics,
    llava_style_reference,
    llava_style_rows,
    make_trainer,
    tiny_llava,
)
from transformers import TrainerCallback  # noqa: E402

from mllm_metrics import MllmMetricsWarning  # noqa: E402
from mllm_metrics.hf import StreamingMetrics, expose_processed_labels  # noqa: E402

CHUNK = 16


def _assert_counts(results: dict, expected: dict) -> None:
    assert results["eval_rows"] == expected["rows"]
    for name in ("correct_tokens", "supervised_tokens"):
        assert results[f"eval_{name}"] == expected[name], name
    assert results["eval_nll"] == pytest.approx(expected["nll"], rel=1e-6)


@pytest.mark.skipif(not HAS_BATCH_EVAL_METRICS, reason="needs `batch_eval_metrics`")
def test_exposing_again_after_an_interrupted_evaluation_starts_from_zero(tmp_path):
    # A notebook cell run again after an interrupted evaluate(): a new exposure of the same
    # model must not number its first evaluation as the interrupted one was numbered.
    model = tiny_llava()
    rows = llava_style_rows(model, 7)
    expected = llava_style_reference(model, rows, batch_size=2)
    streaming = StreamingMetrics(counting_metrics())
    with expose_processed_labels(model, logits_chunk_size=CHUNK, metrics=streaming):
        left = _interrupted_evaluate(model, rows, streaming, tmp_path)
    assert left > 0
    with expose_processed_labels(model, logits_chunk_size=CHUNK, metrics=streaming):
        trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, True)
        with pytest.warns(MllmMetricsWarning, match=f"dropped the {left} rows of an evaluation"):
            results = trainer.evaluate()
    _assert_counts(results, expected)


class _EvalAgain(TrainerCallback):
    """A callback that puts the model in evaluation mode again after each batch."""

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        model.eval()


@pytest.mark.skipif(not HAS_BATCH_EVAL_METRICS, reason="needs `batch_eval_metrics`")
def test_an_eval_call_during_an_evaluation_is_not_silent(tmp_path):
    # With batch_eval_metrics each batch is summed as it comes, so a new number drops the rows
    # before it (concatenated, the batches are summed once, at the end, whatever their number).
    model = tiny_llava()
    rows = llava_style_rows(model, 5)
    streaming = StreamingMetrics(counting_metrics())
    with expose_processed_labels(model, logits_chunk_size=CHUNK, metrics=streaming):
        trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, True)
        trainer.add_callback(_EvalAgain())
        with pytest.warns(MllmMetricsWarning, match="called `model.eval[(][)]` on the exposed"):
            trainer.evaluate()


def _most_common_answer_token(rows: list[dict]) -> int:
    (token, _count), *_ = Counter(t for row in rows for t in row["answer"]).most_common(1)
    return token


@pytest.mark.parametrize("exposure", ["labels only", "full logits", "supervised-only head"])
def test_an_ignore_index_other_than_minus_100_ignores_both(exposure, tmp_path):
    # The model writes -100 on image and padding positions whatever the metrics' ignore_index;
    # a StreamingMetrics(ignore_index=X) ignores X and -100 on every path.
    model = tiny_llava()
    rows = llava_style_rows(model, 7)
    ignored = _most_common_answer_token(rows)
    expected = llava_style_reference(model, rows, batch_size=2, also_ignored=ignored)
    plain = llava_style_reference(model, rows, batch_size=2)
    assert expected["supervised_tokens"] < plain["supervised_tokens"]
    streaming = StreamingMetrics(ignore_index=ignored)
    options = {
        "labels only": {},
        "full logits": {"metrics": streaming},
        "supervised-only head": {"metrics": streaming, "logits_chunk_size": CHUNK},
    }[exposure]
    with expose_processed_labels(model, **options):
        trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, False)
        results = trainer.evaluate()
    for name in ("bit_match", "exact_match", "nll"):
        assert results[f"eval_{name}"] == pytest.approx(expected[name], rel=1e-6), name


def test_a_forward_exposed_without_the_metrics_cannot_feed_another_ignore_index(tmp_path):
    # Its row NLL includes the positions labelled X: refused, not summed into a wrong loss.
    model = tiny_llava()
    rows = llava_style_rows(model, 7)
    streaming = StreamingMetrics(ignore_index=_most_common_answer_token(rows))
    with expose_processed_labels(model, logits_chunk_size=CHUNK):
        trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, False)
        with pytest.raises(ValueError, match="exposed without this object"):
            trainer.evaluate()
    # Without the NLL the token counts need nothing of the forward's: accepted, and exact.
    ignored = _most_common_answer_token(rows)
    expected = llava_style_reference(model, rows, batch_size=2, also_ignored=ignored)
    streaming = StreamingMetrics(ignore_index=ignored, nll=False)
    with expose_processed_labels(model, logits_chunk_size=CHUNK):
        trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, False)
        results = trainer.evaluate()
    assert results["eval_bit_match"] == pytest.approx(expected["bit_match"], rel=1e-6)


def test_a_negative_ignore_index_needs_nothing_of_the_forward(tmp_path):
    # No label is -1 (the forward would have raised on a negative label it does not ignore), so
    # its NLL is the one StreamingMetrics(ignore_index=-1) needs: accepted, and exact.
    model = tiny_llava()
    rows = llava_style_rows(model, 7)
    expected = llava_style_reference(model, rows, batch_size=2)
    streaming = StreamingMetrics(ignore_index=-1)
    with expose_processed_labels(model, logits_chunk_size=CHUNK):
        trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, False)
        results = trainer.evaluate()
    for name in ("bit_match", "exact_match", "nll"):
        assert results[f"eval_{name}"] == pytest.approx(expected[name], rel=1e-6), name
