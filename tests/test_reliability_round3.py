"""Trustworthy numbers, round three, on one process: a new evaluation found by a custom loop,
records that survive a bad directory, a full disk, a second evaluation and a deep copy, and the
same answer for the same input whatever the options. (The rank-dependent cases are in
``test_ranks.py``.)"""

from __future__ import annotations

import copy
import errno
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from _hf_setup import (  # noqa: E402
    HAS_BATCH_EVAL_METRICS,
    counting_metrics,
    llava_style_reference,
)
from _parity import BATCH_SIZE, parity_collate, parity_model, parity_rows  # noqa: E402
from transformers import EvalPrediction, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_utils import EvalLoopOutput  # noqa: E402

from mllm_metrics import GroupedMetric, MllmMetricsWarning, TokenNLL  # noqa: E402
from mllm_metrics.hf import StreamingMetrics, expose_processed_labels  # noqa: E402
from mllm_metrics.lightning import MultimodalLMModule  # noqa: E402


def _arguments(tmp_path, **extra) -> TrainingArguments:
    options = {
        "output_dir": str(tmp_path),
        "per_device_eval_batch_size": BATCH_SIZE,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        **({"batch_eval_metrics": True} if HAS_BATCH_EVAL_METRICS else {}),
        **extra,
    }
    return TrainingArguments(**options)


# ---- a Trainer subclass with its own evaluation loop -----------------------------------------


class _Interrupt(RuntimeError):
    pass


class _ListingTrainer(Trainer):
    """Its own loop: draws the whole loader first (no `all_preds`, no active dataloader when the
    metrics are called), then one batch at a time; it can stop after `stop_after` batches."""

    stop_after: int | None = None

    def evaluation_loop(
        self,
        dataloader,
        description,
        prediction_loss_only=None,
        ignore_keys=None,
        metric_key_prefix="eval",
    ):
        batches = list(dataloader)
        model = self.model
        model.eval()
        metrics = {}
        for step, inputs in enumerate(batches):
            if step == self.stop_after:
                raise _Interrupt("stopped on purpose")
            _, logits, labels = self.prediction_step(model, inputs, False, ignore_keys)
            fields = self.preprocess_logits_for_metrics(logits, labels)
            metrics = self.compute_metrics(
                EvalPrediction(predictions=fields, label_ids=labels),
                compute_result=step == len(batches) - 1,
            )
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=0)


def test_a_custom_evaluation_loop_after_an_interrupted_one_starts_from_zero(tmp_path):
    model = parity_model()
    rows = [{k: v for k, v in row.items() if k != "task"} for row in parity_rows(model)]
    expected = llava_style_reference_rows(model, rows)
    streaming = StreamingMetrics(counting_metrics())
    with expose_processed_labels(model, logits_chunk_size=3, metrics=streaming):
        trainer = _ListingTrainer(
            model=model,
            args=_arguments(tmp_path),
            eval_dataset=rows,
            data_collator=parity_collate,
            compute_metrics=streaming,
            preprocess_logits_for_metrics=streaming.preprocess_logits,
        )
        trainer.stop_after = 2
        with pytest.raises(_Interrupt):
            trainer.evaluate()
        assert streaming.metrics["rows"].rows.item() == 2 * BATCH_SIZE  # left in the sums
        trainer.stop_after = None
        with pytest.warns(MllmMetricsWarning, match=f"dropped the {2 * BATCH_SIZE} rows of an"):
            results = trainer.evaluate()
    assert results["eval_rows"] == len(rows) == 7
    assert results["eval_supervised_tokens"] == expected["supervised_tokens"]
    assert results["eval_correct_tokens"] == expected["correct_tokens"]


def llava_style_reference_rows(model, rows):
    """The brute-force counts of `_hf_setup`, on rows in the forward's own names."""
    prompts_answers = []
    for row in rows:
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        prompts_answers.append(
            {
                "prompt": row["input_ids"][:start],
                "answer": row["input_ids"][start:],
                "image": row["images"],
            }
        )
    return llava_style_reference(model, prompts_answers, batch_size=BATCH_SIZE)


# ---- records: a bad directory, a full disk, a second evaluation, a deep copy -----------------


def _lightning_trainer(**extra) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    return pl.Trainer(**(options | extra))


def _loader(rows) -> DataLoader:
    return DataLoader(rows, batch_size=BATCH_SIZE, collate_fn=parity_collate)


def test_a_records_dir_that_cannot_be_created_fails_at_setup_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = parity_model()
    rows = parity_rows(model)
    module = MultimodalLMModule(model, records_dir=blocker / "records")
    trainer = _lightning_trainer(max_steps=2)
    with pytest.raises(ValueError, match="`records_dir`.*cannot be written"):
        trainer.fit(module, _loader(rows), _loader(rows))
    assert trainer.global_step == 0  # nothing trained
    with pytest.raises(ValueError, match="`records_dir`.*cannot be written"):
        StreamingMetrics(records_dir=blocker / "records")


def test_a_failed_records_write_warns_keeps_the_metrics_and_leaves_no_partial_file(
    tmp_path, monkeypatch
):
    model = parity_model()
    rows = [{k: v for k, v in row.items() if k != "task"} for row in parity_rows(model)]
    loader = _loader(rows)
    [expected] = _lightning_trainer().validate(MultimodalLMModule(model), loader, verbose=False)

    import mllm_metrics.records as records_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records_module.json, "dumps", full_disk)  # fails mid-file
    module = MultimodalLMModule(model, records_dir=tmp_path / "records")
    with pytest.warns(MllmMetricsWarning, match="No space left on device.*not affected"):
        [results] = _lightning_trainer().validate(module, loader, verbose=False)
    assert results == expected  # the metrics survive the failed write
    assert list((tmp_path / "records").iterdir()) == []  # no file, no `.partial`


def test_two_evaluations_at_the_same_step_keep_both_files(tmp_path):
    model = parity_model()
    rows = [{k: v for k, v in row.items() if k != "task"} for row in parity_rows(model)]
    streaming = StreamingMetrics(records_dir=tmp_path / "records")
    with expose_processed_labels(model, logits_chunk_size=3, metrics=streaming):
        trainer = Trainer(
            model=model,
            args=_arguments(tmp_path),
            eval_dataset=rows,
            data_collator=parity_collate,
            compute_metrics=streaming,
            preprocess_logits_for_metrics=streaming.preprocess_logits,
        )
        trainer.evaluate()
        trainer.evaluate()  # e.g. evaluate() after train() at the same step: nothing lost
    files = sorted(path.name for path in (tmp_path / "records").iterdir())
    assert files == ["eval_step0000000-2.jsonl", "eval_step0000000.jsonl"]
    first, second = ((tmp_path / "records" / name).read_text() for name in files)
    assert first == second and len(first.splitlines()) == 7


def test_remove_gives_a_deep_copy_its_own_forward_back_and_it_pickles(tmp_path):
    model = parity_model()
    batch = parity_collate(parity_rows(model)[:2])
    del batch["task"]
    handle = expose_processed_labels(model, logits_chunk_size=3, metrics=StreamingMetrics())
    copied = copy.deepcopy(model)
    assert "forward" in vars(copied) and "train" in vars(copied)
    with pytest.raises(TypeError, match="remove"):
        pickle.dumps(copied)
    handle.remove()
    for module in (model, copied):
        assert "forward" not in vars(module) and "train" not in vars(module)
        assert not module._forward_pre_hooks and not module._forward_hooks
    restored = pickle.loads(pickle.dumps(copied))
    with torch.no_grad():
        own = model(**batch)
        for module in (copied, restored):
            assert torch.equal(module(**batch).logits, own.logits)  # the model's own forward


# ---- the same input, the same answer; errors that say what was received ----------------------


def test_a_label_outside_the_vocabulary_is_an_error_with_or_without_the_nll():
    logits = torch.zeros(1, 3, 8)
    labels = torch.tensor([[-100, 3, 8]])  # 8 is outside a vocabulary of 8
    for nll in (True, False):
        with pytest.raises(ValueError, match="label 8, outside the logits' vocabulary of size 8"):
            StreamingMetrics(nll=nll).preprocess_logits(logits, labels)


def test_generated_ids_instead_of_logits_say_what_to_use():
    generated = torch.randint(10, (2, 20))  # what Seq2SeqTrainer(predict_with_generate) hands on
    with pytest.raises(ValueError, match="generated token ids.*generate_max_new_tokens"):
        StreamingMetrics().preprocess_logits(generated, torch.randint(10, (2, 20)))


def test_group_ids_on_the_meta_device_say_what_was_received():
    metric = GroupedMetric(TokenNLL(), ["vqa", "ocr"])
    group = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="meta device.*shape \\(2,\\)"):
        metric.update(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), group)


def test_records_and_values_say_no_data_no_number_for_every_metric():
    metric = GroupedMetric(TokenNLL(), ["vqa", "ocr"])
    logits = torch.zeros(2, 3, 4)
    target = torch.tensor([[1, 2, 3], [-100, -100, -100]])
    metric.update(logits, target, ["vqa", "ocr"])
    values = metric.compute()
    assert set(values) == {"vqa", "macro"}  # "ocr" had no supervised token: no value at all
    assert all(torch.isfinite(value) for value in values.values())  # nothing NaN in it


def test_a_text_column_without_group_key_is_named_before_transformers_complains():
    model = parity_model()
    batch = parity_collate(parity_rows(model)[:2])  # holds "task": ["vqa", "ocr"]
    module = MultimodalLMModule(model, generate_max_new_tokens=4)  # no group_key
    with pytest.raises(ValueError, match="'task' holds strings.*group_key='task'"):
        _lightning_trainer().validate(module, DataLoader([batch], batch_size=None), verbose=False)


@pytest.mark.parametrize("packed", ["position_ids", "cu_seq_lens_q"])
def test_a_packed_batch_is_an_error_not_one_sample_per_row(packed):
    from mllm_metrics.forward import EvaluationForward

    model = parity_model()
    input_ids = torch.tensor([[1, 5, 6, 2, 1, 7, 2]])  # two sequences in one padding-free row
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if packed == "position_ids":
        batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    else:
        batch["cu_seq_lens_q"] = torch.tensor([0, 4, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"packs several sequences.*{packed}"):
        EvaluationForward(logits_chunk_size=2)(model, batch)


def test_left_padding_positions_are_not_taken_for_packing():
    from mllm_metrics.forward import EvaluationForward

    model = parity_model()
    input_ids = torch.tensor([[0, 0, 1, 5, 2], [1, 6, 7, 5, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])  # HF's left-padding positions
    batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
    EvaluationForward(logits_chunk_size=2)(model, batch | {"labels": input_ids.clone()})
