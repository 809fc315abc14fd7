"""StreamingMetrics with the stock transformers.Trainer: values, state reset, memory, traps.

Runs under transformers 5.x and 4.37 (CI runs this file in a 4.37.2 environment too, where
`batch_eval_metrics` does not exist and the one-call-at-the-end mode is tested).
"""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection

transformers = pytest.importorskip("transformers")
from _hf_setup import (  # noqa: E402
    HAS_BATCH_EVAL_METRICS,
    TRANSFORMERS_MAJOR,
    CorrectTokens,
    Rows,
    SupervisedTokens,
    collate_hf_llava,
    collate_llava_style,
    counting_metrics,
    hf_llava_reference,
    hf_llava_rows,
    llava_style_reference,
    llava_style_rows,
    make_trainer,
    tiny_llava,
)
from _models import tiny_hf_llava  # noqa: E402

from mllm_metrics import BitMatchAccuracy  # noqa: E402
from mllm_metrics.hf import IGNORED_OUTPUT_KEYS, StreamingMetrics, expose_processed_labels  # noqa: E402
from mllm_metrics.hf.fields import preprocessed_fields  # noqa: E402
from mllm_metrics.labels import PREPARE_METHOD  # noqa: E402

HAS_EVAL_DO_CONCAT_BATCHES = (
    "eval_do_concat_batches" in inspect.signature(transformers.TrainingArguments).parameters
)

# How Trainer hands the predictions to compute_metrics.
MODES = {
    "one_call": {},
    "one_call_per_batch_list": {"eval_do_concat_batches": False},
    "batch_eval_metrics": {"batch_eval_metrics": True},
}


def _mode(name: str) -> tuple[bool, dict]:
    arguments = dict(MODES[name])
    if arguments.pop("batch_eval_metrics", False):
        if not HAS_BATCH_EVAL_METRICS:
            pytest.skip("this transformers release has no `batch_eval_metrics`")
        return True, arguments
    if arguments and not HAS_EVAL_DO_CONCAT_BATCHES:
        pytest.skip("this transformers release has no `eval_do_concat_batches`")
    return False, arguments


def _metrics_only(results: dict) -> dict:
    """Drop the timing entries of `evaluate()`'s results."""
    timing = ("runtime", "per_second", "preparation_time")
    return {k: v for k, v in results.items() if not any(t in k for t in timing)}


def _assert_matches(results: dict, expected: dict, counts: bool) -> None:
    assert results["eval_bit_match"] == pytest.approx(expected["bit_match"], rel=1e-6)
    assert results["eval_exact_match"] == pytest.approx(expected["exact_match"], rel=1e-6)
    assert results["eval_nll"] == pytest.approx(expected["nll"], rel=1e-5)
    if counts:  # raw counts: a doubled or duplicated sample cannot hide in a ratio
        for name in ("correct_tokens", "supervised_tokens", "rows"):
            assert results[f"eval_{name}"] == expected[name], name


@pytest.fixture(scope="module")
def llava_style():
    model = tiny_llava()
    return model, llava_style_rows(model, 7)


@pytest.fixture(scope="module")
def llava_style_left():
    model = tiny_llava(tokenizer_padding_side="left")
    return model, llava_style_rows(model, 7)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_evaluate_matches_reference_on_llava_style_model(
    mode, padding_side, llava_style, llava_style_left, tmp_path
):
    model, rows = llava_style if padding_side == "right" else llava_style_left
    batch_eval_metrics, arguments = _mode(mode)
    expected = llava_style_reference(model, rows, batch_size=2)
    with expose_processed_labels(model):
        for streaming, counts in (
            (StreamingMetrics(), False),
            (StreamingMetrics(counting_metrics()), True),
        ):
            trainer = make_trainer(
                model,
                rows,
                collate_llava_style,
                streaming,
                tmp_path,
                batch_eval_metrics,
                **arguments,
            )
            first, second = trainer.evaluate(), trainer.evaluate()
            _assert_matches(first, expected, counts)
            assert _metrics_only(second) == _metrics_only(first)  # the sums were reset
    assert all(PREPARE_METHOD not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("mode", ["one_call", "batch_eval_metrics"])
def test_evaluate_matches_reference_on_hf_llava(mode, tmp_path):
    """Labels aligned with the logits in transformers 5; expanded inside forward in 4.37."""
    model = tiny_hf_llava()
    rows = hf_llava_rows(model, 7)
    batch_eval_metrics, arguments = _mode(mode)
    expected = hf_llava_reference(model, rows, batch_size=2)
    assert "keys_to_ignore_at_inference" not in vars(model.config)
    with expose_processed_labels(model):
        # No `ignore_keys`: cache and image fields are ignored through the config.
        assert {"cache", "image_outputs"} <= set(model.config.keys_to_ignore_at_inference)
        assert "image_hidden_states" in model.config.keys_to_ignore_at_inference  # 4.37
        streaming = StreamingMetrics(counting_metrics())
        trainer = make_trainer(
            model, rows, collate_hf_llava, streaming, tmp_path, batch_eval_metrics, **arguments
        )
        first, second = trainer.evaluate(), trainer.evaluate()
    _assert_matches(first, expected, counts=True)
    assert _metrics_only(second) == _metrics_only(first)
    assert "keys_to_ignore_at_inference" not in vars(model.config)


def test_eval_nll_is_token_weighted_on_processed_labels(llava_style, tmp_path):
    """Truncation inside forward drops supervised labels; eval_nll still counts the right ones."""
    model, rows = llava_style
    expected = llava_style_reference(model, rows, batch_size=3)
    with expose_processed_labels(model):
        streaming = StreamingMetrics()
        trainer = make_trainer(
            model,
            rows,
            collate_llava_style,
            streaming,
            tmp_path,
            False,
            per_device_eval_batch_size=3,
        )
        results = trainer.evaluate()
    assert results["eval_nll"] == pytest.approx(expected["nll"], rel=1e-5)
    if TRANSFORMERS_MAJOR >= 5:
        # Trainer's eval_loss divides each batch's summed loss by `num_items_in_batch`, counted
        # on the data set's labels, which still hold the tokens truncation dropped: too low.
        assert results["eval_loss"] < 0.95 * expected["nll"]


def _vocab_sized_storages(vocab_size: int) -> set[int]:
    """Storages of the live tensors shaped like logits (3-D, last dim = the vocabulary)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated torch module attributes
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    return {
        obj.untyped_storage().data_ptr()
        for obj in tensors
        if obj.ndim == 3 and obj.shape[-1] == vocab_size
    }


@pytest.mark.parametrize("mode", ["one_call", "batch_eval_metrics"])
def test_nothing_of_vocabulary_size_is_kept_across_steps(mode, tmp_path):
    vocab = 97  # a vocabulary size no other tensor dimension has
    model = tiny_llava(vocab_size=vocab)
    rows = llava_style_rows(model, 16, greedy=False)
    batch_eval_metrics, arguments = _mode(mode)
    streaming = StreamingMetrics(counting_metrics())
    steps, live_logits, received = [], [], []

    def preprocess(logits, labels):
        steps.append(len(steps))
        if len(steps) in (4, 8):  # a scan takes a while: twice, after some steps have passed
            # Only this step's logits may be alive: none of an earlier step is kept anywhere.
            current = (logits[0] if isinstance(logits, tuple) else logits).untyped_storage()
            found = _vocab_sized_storages(vocab)
            assert current.data_ptr() in found  # the scan does see logits
            live_logits.append(found - {current.data_ptr()})
        return streaming.preprocess_logits(logits, labels)

    def compute_metrics(eval_pred, compute_result=True):
        received.append([tuple(p.shape) for p in eval_pred.predictions])
        return streaming(eval_pred, compute_result=compute_result)

    with expose_processed_labels(model):
        trainer = make_trainer(
            model, rows, collate_llava_style, streaming, tmp_path, batch_eval_metrics, **arguments
        )
        trainer.compute_metrics = compute_metrics
        trainer.preprocess_logits_for_metrics = preprocess
        results = trainer.evaluate()

    assert len(steps) == 8 and live_logits == [set(), set()]
    assert _vocab_sized_storages(vocab) == set()
    # compute_metrics only ever sees (rows, seq_len - 1) ids and (rows,) sums.
    assert len(received) == (8 if batch_eval_metrics else 1)
    rows_per_call = 2 if batch_eval_metrics else 16
    for header, preds, target, row_nll in received:
        assert header == (rows_per_call, 3)
        assert preds == target and len(preds) == 2 and preds[0] == rows_per_call
        assert row_nll == (rows_per_call,)
    # The metrics keep the same few scalar sums whatever the number of batches.
    states = [s for m in streaming.metrics.values() for s in m.metric_state.values()]
    assert all(state.numel() == 1 for state in states)
    assert results["eval_rows"] == 16


def test_user_metrics_are_not_synced_again():
    """Trainer gathers before compute_metrics: a metric that all-reduces again doubles counts."""

    def doubling_gather(tensor, group=None):  # what a 2-process all-gather returns
        return [tensor, tensor]

    def user_metric():
        return SupervisedTokens(distributed_available_fn=lambda: True, dist_sync_fn=doubling_gather)

    target = torch.tensor([[5, -100, 7], [-100, -100, 2]])
    alone = user_metric()
    alone.update(target, target)
    assert alone.compute() == 6  # the fake "distributed" sync doubles: the test can fail

    given = {
        "single": user_metric(),
        "collection": MetricCollection({"inner": user_metric(), "rows": Rows()}),
    }
    for metrics in (given["single"], given["collection"], [user_metric(), CorrectTokens()]):
        streaming = StreamingMetrics(metrics, nll=False)
        results = streaming(preprocessed_fields(target, target), compute_result=True)
        counts = [v for k, v in results.items() if k in ("SupervisedTokens", "inner")]
        assert counts == [3], results
        assert not any(m.sync_on_compute for m in streaming.metrics.values())
    assert given["single"].sync_on_compute  # the objects passed in are not modified
    assert given["single"].distributed_available_fn() is True


class _OneHotHits(Metric):
    """A user metric that one-hot encodes the ids: a negative id (Trainer's pad) crashes it."""

    full_state_update = False

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.add_state("one_hot_hits", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds, target):
        supervised = target >= 0
        hits = F.one_hot(preds, self.vocab_size) * F.one_hot(target.clamp(min=0), self.vocab_size)
        self.one_hot_hits += (hits.sum(-1) * supervised).sum()

    def compute(self):
        return self.one_hot_hits


def test_trainer_padding_is_ignored_with_any_ignore_index():
    streaming = StreamingMetrics(
        {"bit_match": BitMatchAccuracy(ignore_index=-1), "hits": _OneHotHits(6)}, ignore_index=-1
    )
    logits = torch.zeros(1, 4, 6)
    logits[0, :, 3] = 1.0
    header, preds, target, row_nll = streaming.preprocess_logits(
        logits, torch.tensor([[-1, 3, 3, 4]])
    )
    # Trainer pads with -100 (ids and labels) when it concatenates batches of different lengths.
    preds = torch.cat([preds, torch.full((1, 2), -100)], dim=1)
    target = torch.cat([target, torch.full((1, 2), -100)], dim=1)
    results = streaming((header, preds, target, row_nll))
    assert results["bit_match"] == pytest.approx(2 / 3)
    assert results["hits"] == 2


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def test_remove_unused_columns_trap_gets_a_clear_error(llava_style, tmp_path):
    model, rows = llava_style
    # The data set calls its image column `image`; forward's argument is `images`.
    rows = [
        {
            "input_ids": row["prompt"] + row["answer"],
            "labels": [-100] * len(row["prompt"]) + row["answer"],
            "image": row["image"],
        }
        for row in rows
    ]

    def collate(features):
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], 0),
            "attention_mask": _pad([[1] * len(f["input_ids"]) for f in features], 0),
            "labels": _pad([f["labels"] for f in features], -100),
        }
        if "image" in features[0]:
            batch["images"] = torch.cat([f["image"] for f in features])
        return batch

    arguments = {"remove_unused_columns": True}
    streaming = StreamingMetrics()
    trainer = make_trainer(model, rows, collate, streaming, tmp_path, False, **arguments)
    with pytest.raises(IndexError):  # the trap itself: Trainer dropped `image`
        trainer.evaluate()
    with expose_processed_labels(model):
        with pytest.raises(ValueError, match="remove_unused_columns") as error:
            trainer.evaluate()
        assert "-200" in str(error.value) and "'images'" in str(error.value)
        # With the column kept, the same data evaluates.
        arguments["remove_unused_columns"] = False
        trainer = make_trainer(model, rows, collate, streaming, tmp_path, False, **arguments)
        assert trainer.evaluate()["eval_bit_match"] > 0


@pytest.fixture
def mixed_precision_state():
    """transformers 4.37's `TrainingArguments(bf16=True)` sets ACCELERATE_MIXED_PRECISION in the
    process's environment, and accelerate keeps a singleton state: undo both after a test that
    turns mixed precision on, so that later Trainers run in float32."""
    yield
    from accelerate.state import AcceleratorState

    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_forward_signature_is_kept_and_undo_survives_accelerate_mixed_precision(
    tmp_path, mixed_precision_state
):
    model = tiny_llava()  # not the shared fixture: accelerate's bf16 forward stays on the model
    rows = llava_style_rows(model, 4)
    signature = inspect.signature(model.forward)
    handle = expose_processed_labels(model)
    assert inspect.signature(model.forward) == signature  # Trainer reads it (columns, kwargs)
    streaming = StreamingMetrics()
    trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, False, bf16=True)
    if TRANSFORMERS_MAJOR >= 5:
        assert trainer.model_accepts_loss_kwargs  # num_items_in_batch still reaches forward
    results = trainer.evaluate()
    assert "forward" in vars(model)  # accelerate replaced forward with its autocast wrapper
    assert inspect.signature(model.forward) == signature
    assert 0.0 < results["eval_bit_match"] <= 1.0 and results["eval_nll"] > 0

    handle.remove()
    handle.remove()  # idempotent
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(PREPARE_METHOD not in module.__dict__ for module in model.modules())
    assert "keys_to_ignore_at_inference" not in vars(model.config)
    assert "processed_labels" not in model(**collate_llava_style(rows[:2]))
    # Without the processed labels, the shapes do not line up: the error says what to do.
    trainer = make_trainer(model, rows, collate_llava_style, StreamingMetrics(), tmp_path, False)
    with pytest.raises(ValueError, match="expose_processed_labels"):
        trainer.evaluate()


def test_compute_metrics_without_preprocess_logits_says_so(llava_style, tmp_path):
    model, rows = llava_style
    streaming = StreamingMetrics()
    with expose_processed_labels(model):
        trainer = make_trainer(model, rows, collate_llava_style, streaming, tmp_path, False)
        trainer.preprocess_logits_for_metrics = None
        with pytest.raises(ValueError, match="preprocess_logits_for_metrics"):
            trainer.evaluate()


def test_ignored_output_keys_are_added_to_the_config_and_restored(llava_style):
    model, _ = llava_style
    # LlamaConfig declares ["past_key_values"] in transformers 4, nothing in 5.
    before = getattr(model.config, "keys_to_ignore_at_inference", None)
    with expose_processed_labels(model):
        ignored = model.config.keys_to_ignore_at_inference
        assert ignored[: len(before or [])] == (before or [])
        assert set(IGNORED_OUTPUT_KEYS) <= set(ignored)
    assert getattr(model.config, "keys_to_ignore_at_inference", None) == before
    assert "keys_to_ignore_at_inference" not in vars(model.config)
    # Changed by someone else meanwhile: left alone, with a warning.
    handle = expose_processed_labels(model)
    model.config.keys_to_ignore_at_inference = ["mine"]
    with pytest.warns(UserWarning, match="left as it is"):
        handle.remove()
    assert model.config.keys_to_ignore_at_inference == ["mine"]
    del model.config.keys_to_ignore_at_inference
    assert "keys_to_ignore_at_inference" not in vars(model.config)


def test_hf_module_does_not_need_transformers():
    # torchmetrics imports transformers when installed, so block it only after torchmetrics.
    code = (
        "import sys, torchmetrics\n"
        "for name in ('transformers', 'lightning', 'pytorch_lightning'): sys.modules[name] = None\n"
        "import torch\n"
        "from mllm_metrics.hf import StreamingMetrics, expose_processed_labels\n"
        "streaming = StreamingMetrics()\n"
        "out = streaming.preprocess_logits(torch.zeros(1, 3, 4), torch.tensor([[-100, 0, 1]]))\n"
        "print(streaming(out)['bit_match'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.5"
