"""The supervised-only chunked head: the Trainer path (expose_processed_labels with a chunk size)
and the Lightning module give the full path's numbers while only supervised positions, at most
N at a time, ever reach the output head."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from _models import tiny_llama
from test_chunked_logits import CASES, SpyHead

transformers = pytest.importorskip("transformers")
from _hf_setup import (  # noqa: E402
    HAS_BATCH_EVAL_METRICS,
    collate_llava_style,
    counting_metrics,
    llava_style_rows,
    make_trainer,
    tiny_llava,
)

from mllm_metrics.chunked import NOT_PREDICTED, supervised_head_predictions  # noqa: E402
from mllm_metrics.hf import ChunkedEvalOutput, StreamingMetrics, expose_processed_labels  # noqa: E402
from mllm_metrics.labels import aligned_forward, aligned_hidden_states  # noqa: E402

TIMING = ("runtime", "per_second", "preparation_time")


def _supervised_positions(model, batches) -> int:
    """Positions whose shifted processed label is supervised, from the full forward."""
    total = 0
    with torch.no_grad():
        for batch in batches:
            total += int((aligned_forward(model, batch).labels[:, 1:] != -100).sum())
    return total


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [1, 5])
def test_only_supervised_positions_reach_the_head(case, chunk):
    model, batches = CASES[case]()
    expected = _supervised_positions(model, batches)
    spy = SpyHead(model.get_output_embeddings())
    model.set_output_embeddings(spy)
    for batch in batches:
        with torch.no_grad():
            split = aligned_hidden_states(model, batch)
            full_logits = spy(split.hidden_states)
        spy.rows.clear()
        result = supervised_head_predictions(split.hidden_states, spy, split.labels, chunk)
        assert max(spy.rows) <= chunk
        target = split.labels[:, 1:]
        supervised = target != -100
        assert sum(spy.rows) == int(supervised.sum())
        # Ids equal the full logits' argmax where supervised; NOT_PREDICTED elsewhere.
        full_ids = full_logits[:, :-1].argmax(-1)
        assert torch.equal(result.preds[supervised], full_ids[supervised])
        assert (result.preds[~supervised] == NOT_PREDICTED).all()
        nll = torch.nn.functional.cross_entropy(
            full_logits[:, :-1].transpose(1, 2).double(), target, reduction="none"
        ).sum(1)
        torch.testing.assert_close(result.row_nll, nll, rtol=1e-6, atol=1e-9)
    assert expected > 0


def _evaluate(model, rows, chunk, batch_eval_metrics, tmp_path):
    with expose_processed_labels(model, logits_chunk_size=chunk):
        streaming = StreamingMetrics(counting_metrics())
        trainer = make_trainer(
            model, rows, collate_llava_style, streaming, tmp_path, batch_eval_metrics
        )
        results = trainer.evaluate()
    return {k: v for k, v in results.items() if not any(t in k for t in TIMING)}


@pytest.mark.parametrize("batch_eval_metrics", [False, True])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"tokenizer_padding_side": "left"}, {"tokenizer_model_max_length": 9}],
    ids=["right", "left", "truncated"],
)
def test_trainer_chunked_evaluation_equals_the_full_one(overrides, batch_eval_metrics, tmp_path):
    if batch_eval_metrics and not HAS_BATCH_EVAL_METRICS:
        pytest.skip("this transformers release has no `batch_eval_metrics`")
    model = tiny_llava(**overrides)
    rows = llava_style_rows(model, 7)
    full = _evaluate(model, rows, None, batch_eval_metrics, tmp_path)
    spy = SpyHead(model.get_output_embeddings())
    model.set_output_embeddings(spy)
    chunked = _evaluate(model, rows, 3, batch_eval_metrics, tmp_path)
    assert chunked.keys() == full.keys()
    for name in ("eval_correct_tokens", "eval_supervised_tokens", "eval_rows"):
        assert chunked[name] == full[name], name
    for name in ("eval_bit_match", "eval_exact_match"):
        assert chunked[name] == full[name], name
    assert chunked["eval_nll"] == pytest.approx(full["eval_nll"], rel=1e-6)
    assert chunked["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    # Only the supervised positions reached the head, at most 3 at a time.
    assert max(spy.rows) <= 3 and sum(spy.rows) == full["eval_supervised_tokens"]


def test_trainer_chunked_evaluation_on_hf_llava(tmp_path):
    from _hf_setup import collate_hf_llava, hf_llava_rows
    from _models import hf_llava_expands_inside, tiny_hf_llava

    if hf_llava_expands_inside():
        pytest.skip("transformers 4.x Llava merges image features inside forward: not splittable")
    model = tiny_hf_llava()
    rows = hf_llava_rows(model, 5)
    results = {}
    for chunk in (None, 2):
        with expose_processed_labels(model, logits_chunk_size=chunk):
            streaming = StreamingMetrics(counting_metrics())
            trainer = make_trainer(model, rows, collate_hf_llava, streaming, tmp_path, False)
            results[chunk] = trainer.evaluate()
    for name in ("eval_correct_tokens", "eval_supervised_tokens", "eval_rows", "eval_bit_match"):
        assert results[2][name] == results[None][name], name
    assert results[2]["eval_nll"] == pytest.approx(results[None]["eval_nll"], rel=1e-6)
    assert results[2]["eval_loss"] == pytest.approx(results[None]["eval_loss"], rel=1e-5)


def test_trainer_chunked_evaluation_on_qwen2_vl(tmp_path):
    if not hasattr(transformers, "Qwen2VLForConditionalGeneration"):
        pytest.skip("this transformers release has no Qwen2-VL")
    from _models import qwen2_vl_batch, tiny_qwen2_vl
    from _reference import favour_token

    model = favour_token(tiny_qwen2_vl(), bias=0.5)
    generator = torch.Generator().manual_seed(5)
    rows = [
        {
            "answer": torch.tensor([5, 5, 9])[torch.randint(3, (1 + i % 4,), generator=generator)],
            "pixels": torch.randn(16, 24, generator=generator),
        }
        for i in range(5)
    ]

    def collate(batch_rows):
        batch = qwen2_vl_batch(generator, [row["answer"].tolist() for row in batch_rows])
        batch["pixel_values"] = torch.cat([row["pixels"] for row in batch_rows])
        return batch

    results = {}
    for chunk in (None, 2):
        with expose_processed_labels(model, logits_chunk_size=chunk):
            streaming = StreamingMetrics(counting_metrics())
            trainer = make_trainer(model, rows, collate, streaming, tmp_path, False)
            results[chunk] = trainer.evaluate()
    assert 0 < results[None]["eval_correct_tokens"] < results[None]["eval_supervised_tokens"]
    for name in ("eval_correct_tokens", "eval_supervised_tokens", "eval_rows", "eval_bit_match"):
        assert results[2][name] == results[None][name], name
    assert results[2]["eval_nll"] == pytest.approx(results[None]["eval_nll"], rel=1e-6)
    assert results[2]["eval_loss"] == pytest.approx(results[None]["eval_loss"], rel=1e-5)


def test_training_forwards_and_forwards_without_labels_are_the_models_own():
    model = tiny_llava().train()
    rows = llava_style_rows(model, 2)
    batch = collate_llava_style(rows)
    with expose_processed_labels(model, logits_chunk_size=4):
        assert model(**batch).logits.ndim == 3  # training: logits and the model's loss
        model.eval()
        without_labels = {k: v for k, v in batch.items() if k != "labels"}
        assert model(**without_labels).logits.ndim == 3
        outputs = model(**batch)
    assert isinstance(outputs, ChunkedEvalOutput)
    full = model(**batch)  # after remove(): the full forward again
    assert outputs.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    # The processed labels travel inside the output's fields, as the model computed them.
    with torch.no_grad():
        processed = aligned_forward(model, batch).labels
    assert torch.equal(outputs.processed_labels, processed)
    assert torch.equal(outputs.logits[2], processed) and "processed_labels" not in outputs


def test_the_loss_divides_by_num_items_in_batch_when_given():
    model = tiny_llama()
    parameters = inspect.signature(model.forward).parameters
    if "num_items_in_batch" not in parameters and "kwargs" not in parameters:
        pytest.skip("this transformers release's Llama takes no `num_items_in_batch`")
    input_ids = torch.randint(16, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :2] = -100
    with expose_processed_labels(model, logits_chunk_size=4), torch.no_grad():
        chunked = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(20))
    with torch.no_grad():
        full = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(20))
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)


def test_signature_copies_pickling_and_remove():
    model = tiny_llava().eval()
    batch = collate_llava_style(llava_style_rows(model, 2))
    signature = inspect.signature(model.forward)
    handle = expose_processed_labels(model, logits_chunk_size=2)
    assert inspect.signature(model.forward) == signature
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        duplicate.get_output_embeddings().weight.mul_(-1)  # the copy must use its own head
        mine, theirs = model(**batch), duplicate(**batch)
    assert isinstance(theirs, ChunkedEvalOutput)
    assert not torch.equal(mine.row_nll, theirs.row_nll)
    with pytest.raises(TypeError, match="remove"):
        pickle.dumps(model)
    handle.remove()
    assert "forward" not in vars(model)
    assert inspect.signature(model.forward) == signature
    pickle.dumps(model)  # fine once removed


def test_a_deep_copy_calls_its_own_forward_when_the_instance_had_one():
    model = tiny_llama().eval()
    model.forward = model.forward  # an instance-level forward, as accelerate's wrappers set
    input_ids = torch.randint(16, (2, 6), generator=torch.Generator().manual_seed(0))
    handle = expose_processed_labels(model, logits_chunk_size=2)
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        duplicate.get_output_embeddings().weight.mul_(-1)
        mine, theirs = model(input_ids=input_ids), duplicate(input_ids=input_ids)  # no labels
    assert not torch.allclose(mine.logits, theirs.logits)  # the copy ran its own weights
    handle.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_models_logit_soft_cap_is_applied_by_the_split(dtype, tmp_path):
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers release has no Gemma2")
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=5.0,
    )
    # bfloat16: the cap runs in the head's dtype, as in the model, before the loss upcasts.
    model = Gemma2ForCausalLM(config).to(dtype).eval()
    input_ids = torch.randint(16, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        full = model(input_ids=input_ids, labels=labels)
    with torch.no_grad(), expose_processed_labels(model, logits_chunk_size=2):
        chunked = model(input_ids=input_ids, labels=labels)  # split: head, then the soft cap
    # The split applies Gemma 2's tanh(logits / 5) * 5: the ids and the loss are the model's.
    assert isinstance(chunked, ChunkedEvalOutput)
    supervised = labels[:, 1:] != -100
    ids = chunked.predictions[:, :-1]
    assert torch.equal(ids[supervised], full.logits[:, :-1].argmax(-1)[supervised])
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
