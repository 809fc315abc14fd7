"""Trainer under real DDP: 2 CPU processes (torchrun, gloo) give exactly the single-process values.

The eval set has 7 samples and 2 per device: the second process's last batch is padded with a
duplicate of sample 0, which Trainer must drop, and each process's logits have their own length.
The worker is `_hf_setup.py`; raw counts (supervised tokens, correct tokens, rows) show a doubled
count or a duplicated sample that a ratio would hide.
"""

from __future__ import annotations

import json

import pytest
from _torchrun import run_on_two_processes

pytest.importorskip("transformers")
from _hf_setup import (  # noqa: E402
    HAS_BATCH_EVAL_METRICS,
    collate_llava_style,
    counting_metrics,
    ddp_eval_set,
    llava_style_reference,
    make_trainer,
    per_sample_reference,
)
from test_hf_records import assert_records_equal, text_reference  # noqa: E402

from mllm_metrics.hf import StreamingMetrics, expose_processed_labels  # noqa: E402

METRICS = ("bit_match", "exact_match", "supervised_tokens", "correct_tokens", "rows")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_ddp")


@pytest.fixture(scope="module")
def ranks_results(out_dir) -> list[dict]:
    return run_on_two_processes("_hf_setup.py", out_dir)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[dict, dict]:
    """The brute-force reference, and stock Trainer.evaluate() in this one process."""
    model, rows = ddp_eval_set()
    expected = llava_style_reference(model, rows, batch_size=2)
    with expose_processed_labels(model):
        streaming = StreamingMetrics(counting_metrics())
        output_dir = tmp_path_factory.mktemp("hf_single")
        trainer = make_trainer(model, rows, collate_llava_style, streaming, output_dir, False)
        return expected, trainer.evaluate()


def test_the_run_was_distributed(ranks_results):
    for results in ranks_results:
        assert results["world_size"] == 2 and results["backend"] == "gloo"
    modes = [False, True] if HAS_BATCH_EVAL_METRICS else [False]
    for mode in modes:
        assert all(f"batch_eval_metrics={mode}" in results for results in ranks_results)


@pytest.mark.parametrize("batch_eval_metrics", [False, True])
def test_every_rank_gets_the_single_process_values(
    batch_eval_metrics, ranks_results, single_process
):
    if batch_eval_metrics and not HAS_BATCH_EVAL_METRICS:
        pytest.skip("this transformers release has no `batch_eval_metrics`")
    expected, single = single_process
    assert single["eval_rows"] == 7
    for results in ranks_results:
        if HAS_BATCH_EVAL_METRICS:  # rows of both ranks' first batch were left in the sums
            assert results[f"interrupted_with={batch_eval_metrics}"] == 2
        first, second = results[f"batch_eval_metrics={batch_eval_metrics}"]
        chunked = results[f"chunked:batch_eval_metrics={batch_eval_metrics}"]
        for name in METRICS:  # the supervised-only chunked head, on 2 processes
            assert chunked[f"eval_{name}"] == single[f"eval_{name}"], name
        assert chunked["eval_nll"] == pytest.approx(single["eval_nll"], rel=1e-6)
        assert chunked["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5)
        # The first evaluate() follows an interrupted one; the second starts from reset sums.
        for run in (first, second):
            # Raw counts: neither doubled by a second all-reduce nor inflated by the duplicate.
            assert run["eval_rows"] == 7
            assert run["eval_supervised_tokens"] == expected["supervised_tokens"]
            assert run["eval_correct_tokens"] == expected["correct_tokens"]
            for name in METRICS:
                assert run[f"eval_{name}"] == single[f"eval_{name}"], name
            assert run["eval_bit_match"] == pytest.approx(expected["bit_match"], rel=1e-6)
            assert run["eval_exact_match"] == pytest.approx(expected["exact_match"], rel=1e-6)
            assert run["eval_nll"] == pytest.approx(expected["nll"], rel=1e-5)
            assert run["eval_nll"] == pytest.approx(single["eval_nll"], rel=1e-9)


@pytest.mark.parametrize("batch_eval_metrics", [False, True])
def test_process_zero_writes_the_records_of_every_sample_once(
    batch_eval_metrics, ranks_results, out_dir
):
    if batch_eval_metrics and not HAS_BATCH_EVAL_METRICS:
        pytest.skip("this transformers release has no `batch_eval_metrics`")
    model, rows = ddp_eval_set()
    expected = per_sample_reference(model, rows)
    [path] = (out_dir / f"records_{batch_eval_metrics}").iterdir()
    assert path.name == "eval_step0000000.jsonl"
    # 7 samples, not 8: the duplicate that pads the second process's last batch is not there.
    # Counts and strings exactly (checked first), each row's NLL to float32 rounding.
    assert_records_equal([json.loads(line) for line in path.read_text().splitlines()], expected)
    key = f"batch_eval_metrics={batch_eval_metrics}"
    assert [rank[f"records_kept:{key}"] for rank in ranks_results] == [True, False]
    text_bit_match, text_exact_match = text_reference(expected)
    for rank in ranks_results:
        results = rank[f"records:{key}"]
        assert results["eval_text_bit_match"] == pytest.approx(text_bit_match, rel=1e-6)
        assert results["eval_text_exact_match"] == pytest.approx(text_exact_match, rel=1e-6)


def test_repeats_the_gather_keeps_are_not_silent(ranks_results):
    # Each process reads the 7 rows itself and accelerate pads process 1's last batch with a
    # sample of its first batch; the gather keeps it, with a length or without: 8 rows. (Should
    # accelerate learn to drop it, this test says the warning can go.) A map-style set with
    # drop_last loses samples instead and repeats none: no warning.
    for results in ranks_results:
        cases = results["gathered_repeats"]
        for name, count in (
            ("iterable", "up to processes x batch size - 1 samples"),
            ("sized iterable", "1 sample"),
        ):
            assert cases[name]["results"]["eval_rows"] == 8, name
            (warning,) = cases[name]["warnings"]
            assert f"counts {count} twice" in warning, name
        dropped = cases["map-style, drop_last"]
        assert dropped["results"]["eval_rows"] == 4  # 2 full batches of 2 on 2 processes
        assert dropped["warnings"] == []
