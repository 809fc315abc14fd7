"""One evaluation core, two shells: every feature reaches the Trainer path, and the Trainer path
and the Lightning module give the same values and records as an independent reference."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from _hf_setup import HAS_BATCH_EVAL_METRICS, SpellTokenizer  # noqa: E402
from _parity import (  # noqa: E402
    BATCH_SIZE,
    GROUPS,
    MAX_NEW_TOKENS,
    assert_records_match,
    expected_samples,
    expected_values,
    parity_collate,
    parity_model,
    parity_rows,
)
from transformers import Trainer, TrainingArguments  # noqa: E402

from mllm_metrics.hf import StreamingMetrics, expose_processed_labels  # noqa: E402
from mllm_metrics.lightning import MultimodalLMModule  # noqa: E402


@pytest.fixture(scope="module")
def eval_set():
    model = parity_model()
    rows = parity_rows(model)
    samples = expected_samples(model, rows)
    # The reference is not degenerate: hits and misses of every kind, a truncated row.
    assert {True, False, None} == {s["exact"] for s in samples}
    assert {True, False} == {s["gen_exact"] for s in samples}
    assert any(s["gen_exact"] != s["exact"] for s in samples)
    return model, rows, samples


def _streaming(records_dir=None) -> StreamingMetrics:
    return StreamingMetrics(
        tokenizer=SpellTokenizer(),
        group_key="task",
        groups=GROUPS,
        generate_max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=2,
        records_dir=records_dir,
    )


def _trainer(model, rows, streaming, output_dir, batch_eval_metrics, **arguments) -> Trainer:
    arguments = {
        "output_dir": str(output_dir),
        "per_device_eval_batch_size": BATCH_SIZE,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        **arguments,  # remove_unused_columns keeps its default, True
    }
    if batch_eval_metrics:
        arguments["batch_eval_metrics"] = True
    return Trainer(
        model=model,
        args=TrainingArguments(**arguments),
        eval_dataset=rows,
        data_collator=parity_collate,
        compute_metrics=streaming,
        preprocess_logits_for_metrics=streaming.preprocess_logits,
    )


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_values(results: dict, expected: dict, prefix: str) -> None:
    metric_keys = {
        key for key in results if not key.endswith(("_loss", "_runtime", "_second", "_time"))
    }
    metric_keys.discard("epoch")
    # Exactly the expected keys: "chart" has no data, so no value at all.
    assert metric_keys == {f"{prefix}{key}" for key in expected}
    for key, value in expected.items():
        assert results[f"{prefix}{key}"] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("chunk", [3, None], ids=["chunked", "model-forward"])
@pytest.mark.parametrize("batch_eval_metrics", [True, False], ids=["per-batch", "one-call"])
def test_trainer_gives_groups_generated_answers_and_records_of_the_reference(
    eval_set, tmp_path, batch_eval_metrics, chunk
):
    if batch_eval_metrics and not HAS_BATCH_EVAL_METRICS:
        pytest.skip("this transformers release has no `batch_eval_metrics`")
    model, rows, samples = eval_set
    streaming = _streaming(tmp_path / "records")
    with expose_processed_labels(model, logits_chunk_size=chunk, metrics=streaming):
        trainer = _trainer(model, rows, streaming, tmp_path, batch_eval_metrics)
        results = trainer.evaluate(metric_key_prefix="dev")
    _assert_values(results, expected_values(samples), "dev_")
    [path] = (tmp_path / "records").iterdir()
    assert path.name == "dev_step0000000.jsonl"
    assert_records_match(_read(path), samples)


def test_lightning_and_trainer_give_the_same_values_and_records(eval_set, tmp_path):
    model, rows, samples = eval_set
    streaming = _streaming(tmp_path / "trainer")
    with expose_processed_labels(model, logits_chunk_size=3, metrics=streaming):
        trainer = _trainer(model, rows, streaming, tmp_path, HAS_BATCH_EVAL_METRICS)
        hf_results = trainer.evaluate()
    module = MultimodalLMModule(
        model,
        tokenizer=SpellTokenizer(),
        logits_chunk_size=3,
        group_key="task",
        groups=GROUPS,
        records_dir=tmp_path / "lightning",
        generate_max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=2,
    )
    loader = DataLoader(rows, batch_size=BATCH_SIZE, collate_fn=parity_collate)
    lightning = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    [pl_results] = lightning.validate(module, loader, verbose=False)
    # Every value: the same key (loss <-> nll), the same number.
    renamed = {
        key.replace("val/loss", "val/nll").replace("val/", "eval_"): value
        for key, value in pl_results.items()
    }
    shared = {key for key in hf_results if key in renamed}
    assert {key for key in renamed} == shared
    assert len(shared) == len(expected_values(samples))
    for key in shared:
        assert renamed[key] == pytest.approx(hf_results[key], rel=1e-6), key
    # The same records, line for line.
    [hf_path] = (tmp_path / "trainer").iterdir()
    [pl_path] = (tmp_path / "lightning").iterdir()
    hf_records, pl_records = _read(hf_path), _read(pl_path)
    assert_records_match(hf_records, samples)
    assert_records_match(pl_records, samples)


def test_groups_or_generation_without_the_exposure_say_so_at_the_first_batch(eval_set, tmp_path):
    model, rows, _ = eval_set
    streaming = _streaming()
    with expose_processed_labels(model, logits_chunk_size=3):  # not given `metrics=streaming`
        trainer = _trainer(model, rows, streaming, tmp_path, HAS_BATCH_EVAL_METRICS)
        with pytest.raises(ValueError, match=r"group_key='task'.*metrics=streaming"):
            trainer.evaluate()


def test_the_chunked_forward_without_preprocess_logits_is_a_clear_error(eval_set, tmp_path):
    model, rows, _ = eval_set
    streaming = StreamingMetrics()
    with expose_processed_labels(model, logits_chunk_size=3):
        trainer = _trainer(model, rows, streaming, tmp_path, HAS_BATCH_EVAL_METRICS)
        trainer.preprocess_logits_for_metrics = None  # the natural omission
        with pytest.raises(ValueError, match="preprocess_logits_for_metrics"):
            trainer.evaluate()


def test_the_group_column_reaches_the_forward_through_remove_unused_columns(eval_set):
    model, rows, _ = eval_set
    streaming = _streaming()
    with expose_processed_labels(model, logits_chunk_size=3, metrics=streaming):
        import inspect

        assert "task" in inspect.signature(model.forward).parameters
        batch = parity_collate(rows[:2])
        model.train()
        outputs = model(**batch)  # a training forward: the model's own, without the group key
        assert outputs.loss is not None and outputs.logits.ndim == 3
        model.eval()
    assert "task" not in inspect.signature(model.forward).parameters


def test_no_data_no_number_for_an_empty_group_in_every_metric(eval_set, tmp_path):
    model, rows, _ = eval_set
    streaming = _streaming()
    with expose_processed_labels(model, logits_chunk_size=3, metrics=streaming):
        trainer = _trainer(model, rows, streaming, tmp_path, HAS_BATCH_EVAL_METRICS)
        results = trainer.evaluate()
    assert not [key for key in results if key.endswith("/chart")]
    assert all(torch.isfinite(torch.tensor(value)) for value in results.values())
