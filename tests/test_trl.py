"""StreamingMetrics with TRL's SFTTrainer (fused LM head): values, head positions, forwards.

``SFTTrainer.__init__`` (TRL 1.x) always replaces the model's ``forward`` with a fused-LM-head
forward, and per evaluation batch with ``compute_metrics`` given, ``compute_loss`` calls
``model(**inputs, fused_lm_head=True)`` (its loss, from ``log_probs``) and then the model again
without labels, for the logits it hands to ``preprocess_logits_for_metrics``. The exposed model
must leave the first call to TRL and serve the second with its supervised-only head, whether it
is exposed before or after ``SFTTrainer(...)``. Expectations that depend on those TRL internals
are marked "TRL internals".

Tiny Llama (vocab 64, hidden 32, 2 layers), 7 pre-tokenized rows, eval batches of 2 (7, 9, 5
and 1 supervised positions), float32 on CPU; the reference is the model's plain class forward
counted in Python (_trl_setup.reference).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from _hf_setup import counting_metrics  # noqa: E402
from _trl_setup import (  # noqa: E402
    CHUNK,
    Spy,
    batches,
    eval_rows,
    positions_per_batch,
    reference,
    sft_trainer,
    supervised_per_batch,
    tiny_llama,
)

from mllm_metrics import MllmMetricsWarning  # noqa: E402
from mllm_metrics.hf import StreamingMetrics, expose_processed_labels  # noqa: E402
from mllm_metrics.hf.model import _EvaluationForward  # noqa: E402

pytestmark = [
    # TRL 1.16 deprecates the logits it recomputes for compute_metrics (what we serve).
    pytest.mark.filterwarnings("ignore:`return_outputs=True`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
]

ORDERS = ["after", "before"]  # expose_processed_labels after / before SFTTrainer(...)
# TRL's own metrics, computed from its fused call: exposing must leave them as they are.
TRL_KEYS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy")


@pytest.fixture(scope="module")
def rows():
    return eval_rows(tiny_llama())


@pytest.fixture(scope="module")
def expected(rows):
    return reference(tiny_llama(), rows)


@pytest.fixture(scope="module")
def trl_alone(rows):
    """TRL's evaluation of the same model without mllm-metrics (compute_metrics=None)."""
    return sft_trainer(tiny_llama(), rows).evaluate()


def _chunks(supervised: int) -> list[int]:
    """The positions per head call of the chunked head: CHUNK at a time."""
    return [min(CHUNK, supervised - start) for start in range(0, supervised, CHUNK)]


def _exposed_trainer(order, model, rows, streaming, chunk=CHUNK, metrics=True, **arguments):
    def expose():
        expose_processed_labels(
            model, logits_chunk_size=chunk, metrics=streaming if metrics else None
        )

    if order == "before":
        expose()
    trainer = sft_trainer(model, rows, streaming=streaming, **arguments)
    if order == "after":
        expose()
    return trainer


def _assert_matches(results, expected):
    assert results["eval_bit_match"] == pytest.approx(expected["bit_match"], rel=1e-6)
    assert results["eval_exact_match"] == pytest.approx(expected["exact_match"], rel=1e-6)
    assert results["eval_nll"] == pytest.approx(expected["nll"], rel=1e-5)
    for name in ("correct_tokens", "supervised_tokens", "rows"):  # raw counts: exact
        assert results[f"eval_{name}"] == expected[name], name


@pytest.mark.parametrize("order", ORDERS)
def test_evaluate_matches_reference_and_keeps_trl_loss(order, rows, expected, trl_alone):
    model = tiny_llama()
    streaming = StreamingMetrics(metrics=counting_metrics())
    trainer = _exposed_trainer(order, model, rows, streaming)
    # TRL internals: exposed after, our wrapper is outermost and passes TRL's fused calls on;
    # exposed before, TRL's fused forward is outermost and calls ours when not fused.
    assert isinstance(vars(model)["forward"], _EvaluationForward) == (order == "after")
    first, second = trainer.evaluate(), trainer.evaluate()  # no AttributeError: log_probs
    _assert_matches(first, expected)
    _assert_matches(second, expected)  # the sums were reset between evaluations
    for key in TRL_KEYS:  # TRL's fused-head loss and metrics are untouched (bit for bit)
        assert first[key] == trl_alone[key], key
    assert first["eval_nll"] != first["eval_loss"]  # TRL's loss is a mean of batch means


@pytest.mark.parametrize("order", ORDERS)
def test_supervised_only_head_serves_trl_recompute(order, rows, expected):
    model = tiny_llama()
    streaming = StreamingMetrics(metrics=counting_metrics())
    trainer = _exposed_trainer(order, model, rows, streaming)
    spy = Spy(model)
    _assert_matches(trainer.evaluate(), expected)
    per_batch = spy.per_batch()
    assert len(per_batch) == len(batches(rows)) == 4
    full = positions_per_batch(rows)
    assert full == [18, 18, 10, 5] and supervised_per_batch(rows) == [7, 9, 5, 1]
    for indices, batch, positions in zip(per_batch, batches(rows), full):
        heads = [i for i in indices if spy.events[i][0] == "head"]
        sizes = [spy.events[i][1] for i in heads]
        supervised = batch["labels"][:, 1:] != -100
        # Only the supervised positions reach the head, CHUNK at a time; never all B * L.
        assert sizes == _chunks(int(supervised.sum())), sizes
        assert positions not in sizes and max(sizes) <= CHUNK
        # And they are exactly the supervised positions: the head's inputs are the hidden
        # states our backbone forward (the last one of the batch) computed at those positions.
        backbones = [i for i in indices if spy.events[i][0] == "backbone"]
        hidden = spy.tensors[backbones[-1]]
        assert backbones[-1] < heads[0]
        assert torch.equal(torch.cat([spy.tensors[i] for i in heads]), hidden[:, :-1][supervised])
        # The labels TRL's fused call (the batch's first) was given are the collated ones.
        assert torch.equal(spy.tensors[indices[0]], batch["labels"])


def _plain_compute_metrics(prediction, compute_result=False):
    return {}


# Per evaluation batch (B * L positions, S supervised): (top-level model calls, backbone
# forwards, positions per output-head module call). TRL internals: TRL 1.16's compute_loss
# makes the fused call (its loss; its head multiplies lm_head.weight, no module call), then,
# with compute_metrics, a label-less call for the logits. Measured:
#   mllm-metrics, chunk 4, exposed after or before: 2 calls, 2 backbone forwards (TRL's fused
#       one, ours up to the hidden states), head calls of [4, 3], [4, 4, 1], [4, 1], [1]
#       positions (S = 7, 9, 5, 1): no full logits;
#   mllm-metrics hooks only (no chunk size, no metrics=): 2 calls, 2 backbone forwards, one
#       head call over all B * L = 18, 18, 10, 5 positions (TRL's full-logits recompute);
#   TRL with a plain compute_metrics: the same, 2 / 2 / [B * L];
#   TRL with compute_metrics=None: 1 call, 1 backbone forward, no head module call.
SETUPS = ["mllm_after", "mllm_before", "hooks_after", "hooks_before", "trl_metrics", "trl_alone"]


@pytest.mark.parametrize("setup", SETUPS)
def test_forwards_per_eval_batch(setup, rows):
    model = tiny_llama()
    streaming = StreamingMetrics(metrics=counting_metrics())
    if setup.startswith("mllm"):
        trainer = _exposed_trainer(setup.split("_")[1], model, rows, streaming)
    elif setup.startswith("hooks"):
        trainer = _exposed_trainer(setup.split("_")[1], model, rows, streaming, None, False)
    elif setup == "trl_metrics":
        trainer = sft_trainer(model, rows, compute_metrics=_plain_compute_metrics)
    else:
        trainer = sft_trainer(model, rows)
    spy = Spy(model)
    if setup.startswith("hooks"):  # the exposure says once what TRL's recompute costs
        with pytest.warns(MllmMetricsWarning, match="second forward"):
            trainer.evaluate()
    else:
        trainer.evaluate()
    seen = []
    for events in spy.events_per_batch():
        calls = [event[1:3] for event in events if event[0] == "call"]
        backbones = sum(event[0] == "backbone" for event in events)
        heads = [event[1] for event in events if event[0] == "head"]
        seen.append((calls, backbones, heads))
    fused, recompute = (True, True), (False, False)  # (fused_lm_head, with labels)
    if setup.startswith("mllm"):
        expected = [([fused, recompute], 2, _chunks(s)) for s in supervised_per_batch(rows)]
    elif setup == "trl_alone":
        expected = [([fused], 1, []) for _ in batches(rows)]
    else:
        expected = [([fused, recompute], 2, [n]) for n in positions_per_batch(rows)]
    assert seen == expected


def _untimed(entry):
    timing = ("runtime", "per_second", "total_flos")
    return {key: value for key, value in entry.items() if not any(t in key for t in timing)}


@pytest.mark.parametrize("order", ORDERS)
def test_training_unaffected(order, rows, expected):
    arguments = {
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "seed": 0,
        "eval_strategy": "no",
    }
    plain = tiny_llama()
    plain_trainer = sft_trainer(plain, rows, **arguments)
    plain_trainer.train()
    model = tiny_llama()
    streaming = StreamingMetrics(metrics=counting_metrics())
    trainer = _exposed_trainer(order, model, rows, streaming, **arguments)
    trainer.train()
    # Every logged value (loss, grad_norm, TRL's train entropy and token accuracy...) is the
    # same bit for bit; only the timings differ.
    logged = [_untimed(entry) for entry in trainer.state.log_history]
    assert logged == [_untimed(entry) for entry in plain_trainer.state.log_history]
    assert [entry["step"] for entry in logged if "loss" in entry] == [1, 2, 3]
    for (name, weight), (_, weight_plain) in zip(
        model.named_parameters(), plain.named_parameters(), strict=True
    ):
        assert torch.equal(weight, weight_plain), name
    trained = reference(model.eval(), rows)
    assert trained["nll"] != expected["nll"]  # the weights did change
    _assert_matches(trainer.evaluate(), trained)


@pytest.mark.parametrize("order", ORDERS)
def test_hooks_exposure_without_chunk_size(order, rows, expected, trl_alone):
    """Exposed with neither a chunk size nor ``metrics=``: the model keeps the forward TRL gave
    it, so TRL's second call per batch recomputes the full (B, L, vocab) logits (see
    test_forwards_per_eval_batch), and ``preprocess_logits`` reduces them: exact all the same."""
    model = tiny_llama()
    streaming = StreamingMetrics(metrics=counting_metrics())
    trainer = _exposed_trainer(order, model, rows, streaming, chunk=None, metrics=False)
    assert not isinstance(vars(model)["forward"], _EvaluationForward)
    spy = Spy(model)
    with pytest.warns(MllmMetricsWarning, match="logits_chunk_size=256"):  # once, what it costs
        results = trainer.evaluate()
    _assert_matches(results, expected)
    for key in TRL_KEYS:
        assert results[key] == trl_alone[key], key
    heads = [event[1] for event in spy.events if event[0] == "head"]
    assert heads == positions_per_batch(rows)  # the whole logits, every batch
