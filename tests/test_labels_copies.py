"""Exposed models behave as models (deep copy, pickle, torch.save, state_dict, clean undo), the
processed-labels registry recognises labels by identity, and every path that runs a LLaVA-style
forward turns missing images into a clear error."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from _reference import processed_labels_by_hand
from torch import nn

from mllm_metrics import labels as labels_module
from mllm_metrics.labels import (
    PREPARE_METHOD,
    _is_processed_labels,
    _remember_processed_labels,
    aligned_forward,
    aligned_hidden_states,
    expose_processed_labels,
)

transformers = pytest.importorskip("transformers")
from test_labels import _batch, _tiny_llava  # noqa: E402

from mllm_metrics.demo import TinyLlavaForCausalLM, make_multimodal_batch  # noqa: E402
from mllm_metrics.hf import expose_processed_labels as hf_expose_processed_labels  # noqa: E402

HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
IGNORE_KEYS = "keys_to_ignore_at_inference"


def _trace(model: nn.Module) -> dict:
    """Everything an exposure could leave on a model: attributes, hooks, config keys."""
    return {
        "attributes": {name: sorted(vars(module)) for name, module in model.named_modules()},
        "hooks": {
            name: {d: list(getattr(module, d)) for d in HOOK_DICTS}
            for name, module in model.named_modules()
        },
        "config": sorted(vars(model.config)),
    }


def _no_shadowing_attribute(model: nn.Module) -> bool:
    return all(PREPARE_METHOD not in vars(module) for module in model.modules())


def _change_projector(model: TinyLlavaForCausalLM) -> None:
    with torch.no_grad():
        model.mm_projector.weight.mul_(-3.0)
        model.mm_projector.bias.add_(1.0)


# --------------------------------------------------------------------------------------------
# Deep copies, pickles, state_dict
# --------------------------------------------------------------------------------------------


def test_a_deep_copy_runs_its_own_projector():
    model, batch = _tiny_llava(), _batch()
    reference = copy.deepcopy(model)  # made before the exposure: plain module, no hooks
    with expose_processed_labels(model):
        model(**batch)
        copied = copy.deepcopy(model)
        _change_projector(copied)
        _change_projector(reference)
        original_logits, copy_logits = model(**batch).logits, copied(**batch).logits
    assert not torch.equal(copy_logits, original_logits)
    assert torch.equal(copy_logits, reference(**batch).logits)


def test_a_deep_copy_records_its_own_labels():
    model, batch = _tiny_llava(), _batch()
    with expose_processed_labels(model):
        copied = copy.deepcopy(model)
        copied.config.tokenizer_model_max_length = 6  # the copy truncates, the original does not
        original_outputs, copy_outputs = model(**batch), copied(**batch)
    assert copy_outputs.logits.shape[:2] == (3, 6)
    assert torch.equal(
        copy_outputs.processed_labels, processed_labels_by_hand(copied, batch, max_length=6)
    )
    assert torch.equal(original_outputs.processed_labels, processed_labels_by_hand(model, batch))


@pytest.mark.parametrize("expose", [expose_processed_labels, hf_expose_processed_labels])
def test_remove_leaves_no_trace_on_the_model_nor_on_its_deep_copies(expose):
    model, batch = _tiny_llava(), _batch()
    before = _trace(model)
    handle = expose(model)
    model(**batch)
    copied = copy.deepcopy(model)
    copied(**batch)
    copy_of_copy = copy.deepcopy(copied)
    assert "processed_labels" in copy_of_copy(**batch)
    handle.remove()
    handle.remove()  # idempotent
    for module in (model, copied, copy_of_copy):
        assert _trace(module) == before
        assert _no_shadowing_attribute(module)
        assert IGNORE_KEYS not in vars(module.config)
        assert "processed_labels" not in module(**batch)
    assert labels_module._recordings.stack == []
    assert labels_module._installed == {}


def test_the_config_of_a_deep_copy_gets_its_own_value_back():
    model, batch = _tiny_llava(), _batch()
    model.config.keys_to_ignore_at_inference = ["mine"]
    handle = hf_expose_processed_labels(model)
    copied = copy.deepcopy(model)
    assert copied.config.keys_to_ignore_at_inference[0] == "mine"
    assert len(copied.config.keys_to_ignore_at_inference) > 1
    handle.remove()
    for module in (model, copied):
        assert module.config.keys_to_ignore_at_inference == ["mine"]
    assert copied.config.keys_to_ignore_at_inference is not model.config.keys_to_ignore_at_inference
    assert "processed_labels" not in copied(**batch)


def test_pickle_and_torch_save_work_and_the_loaded_model_records_its_own_labels():
    model, batch = _tiny_llava(), _batch()
    with hf_expose_processed_labels(model):
        model(**batch)
        loaded = [pickle.loads(pickle.dumps(model))]
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded.append(torch.load(buffer, weights_only=False))
    for restored in loaded:
        assert _no_shadowing_attribute(restored)
        restored.config.tokenizer_model_max_length = 6
        outputs = restored(**batch)  # documented: a loaded model keeps recording hooks
        assert torch.equal(
            outputs.processed_labels, processed_labels_by_hand(restored, batch, max_length=6)
        )
        # The same computation on the original, same shapes (the rounding of the first 6
        # positions depends on the BLAS kernels, which the sequence length selects).
        model.config.tokenizer_model_max_length = 6
        assert torch.equal(outputs.logits, model(**batch).logits)
        model.config.tokenizer_model_max_length = None
        bad = {k: v for k, v in batch.items() if k != "images"}
        with pytest.raises(ValueError, match="remove_unused_columns"):
            restored(**bad)
    assert labels_module._recordings.stack == []


def test_state_dict_is_unaffected_by_the_exposure():
    model, batch = _tiny_llava(), _batch()
    plain = model.state_dict()
    with expose_processed_labels(model):
        model(**batch)
        exposed = model.state_dict()
        fresh = TinyLlavaForCausalLM(model.config).eval()
        fresh.load_state_dict(exposed)
    assert list(exposed) == list(plain)
    assert all(torch.equal(exposed[k], plain[k]) for k in plain)
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)


# --------------------------------------------------------------------------------------------
# The wrapper exists only during a forward
# --------------------------------------------------------------------------------------------


def test_the_wrapper_is_installed_only_while_a_forward_runs():
    model, batch = _tiny_llava(), _batch()
    seen = []
    real = TinyLlavaForCausalLM.prepare_inputs_labels_for_multimodal

    def spy(self, *args, **kwargs):
        seen.append(PREPARE_METHOD in vars(self))
        return real(self, *args, **kwargs)

    with expose_processed_labels(model):
        assert _no_shadowing_attribute(model)
        TinyLlavaForCausalLM.prepare_inputs_labels_for_multimodal = spy
        try:
            outputs = model(**batch)
        finally:
            TinyLlavaForCausalLM.prepare_inputs_labels_for_multimodal = real
        assert _no_shadowing_attribute(model)
    assert seen == [True]  # the wrapper was there during the forward, and only then
    assert torch.equal(outputs.processed_labels, processed_labels_by_hand(model, batch))


def test_a_raising_forward_releases_the_wrapper():
    model, batch = _tiny_llava(), _batch()
    batch["images"] = batch["images"][:1]  # fewer images than placeholders: forward raises
    with expose_processed_labels(model):
        with pytest.raises(ValueError, match="placeholder"):
            model(**batch)
        assert _no_shadowing_attribute(model)
        assert labels_module._installed == {} and labels_module._recordings.stack == []


def test_a_prepare_method_replaced_between_forwards_is_wrapped_and_kept():
    model, batch = _tiny_llava(), _batch()
    calls = []
    original = model.prepare_inputs_labels_for_multimodal

    def mine(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with expose_processed_labels(model):
        model.prepare_inputs_labels_for_multimodal = mine
        outputs = model(**batch)
        assert vars(model)[PREPARE_METHOD] is mine
    assert calls == [1]
    assert torch.equal(outputs.processed_labels, processed_labels_by_hand(model, batch))
    assert vars(model)[PREPARE_METHOD] is mine  # the user's attribute is left as it was


def test_several_exposures_and_aligned_forward_share_one_model():
    model, batch = _tiny_llava(), _batch()
    expected = processed_labels_by_hand(model, batch)
    first = expose_processed_labels(model)
    second = hf_expose_processed_labels(model)
    assert torch.equal(model(**batch).processed_labels, expected)
    assert torch.equal(aligned_forward(model, batch).labels, expected)
    first.remove()
    assert torch.equal(model(**batch).processed_labels, expected)
    second.remove()
    assert "processed_labels" not in model(**batch)
    assert not any(getattr(model, d) for d in HOOK_DICTS)
    assert labels_module._recordings.stack == [] and _no_shadowing_attribute(model)


class _ReturnsItsLabels(nn.Module):
    """Returns `processed_labels` itself and also has a prepare method that must not win."""

    def prepare_inputs_labels_for_multimodal(self, labels):
        return (torch.full_like(labels, 7),)

    def forward(self, labels):
        self.prepare_inputs_labels_for_multimodal(labels)
        processed = torch.cat([torch.full((labels.shape[0], 1), -100), labels], dim=1)
        return {"logits": torch.zeros(*processed.shape, 4), "processed_labels": processed}


def test_labels_the_model_returns_are_not_overwritten_by_recorded_ones():
    model = _ReturnsItsLabels()
    with expose_processed_labels(model):
        outputs = model(torch.tensor([[1, 2]]))
    assert outputs["processed_labels"].tolist() == [[-100, 1, 2]]


# --------------------------------------------------------------------------------------------
# The registry of processed labels
# --------------------------------------------------------------------------------------------


def test_exposed_forwards_remember_their_labels_for_the_trainer_tuple():
    model, batch = _tiny_llava(), _batch()
    with expose_processed_labels(model), torch.no_grad():
        outputs = model(**batch)
    labels = outputs.processed_labels
    # What Trainer.prediction_step hands on: a tuple of detached fields, names lost.
    fields = tuple(
        value.detach()
        for key, value in outputs.items()
        if key != "loss" and isinstance(value, torch.Tensor)  # the cache is ignored by Trainer
    )
    assert [_is_processed_labels(value) for value in fields] == [False] * (len(fields) - 1) + [True]
    assert _is_processed_labels(labels) and _is_processed_labels(labels.detach())
    # Equal values stand for the labels (DistributedDataParallel clones the outputs); an integer
    # field of the same shape and dtype with other values never does.
    other = labels.clone()
    other[other != -100] += 1
    assert not _is_processed_labels(other)
    assert not _is_processed_labels(torch.full_like(labels, -100))
    assert not _is_processed_labels(labels.tolist())
    assert not _is_processed_labels(labels[:1])  # same memory, another shape
    assert not _is_processed_labels(labels.to(torch.int32))
    answers = []
    thread = threading.Thread(target=lambda: answers.append(_is_processed_labels(labels)))
    thread.start()
    thread.join()
    assert answers == [False]  # another thread remembers its own


def test_a_new_forward_replaces_the_remembered_labels():
    model, batch = _tiny_llava(), _batch()
    other_batch = dict(batch, labels=torch.where(batch["labels"] == -100, -100, 1))
    with expose_processed_labels(model):
        first = model(**batch).processed_labels
        second = model(**other_batch).processed_labels
    assert first.shape == second.shape and not torch.equal(first, second)
    assert _is_processed_labels(second) and not _is_processed_labels(first)


class _AlignedReturnsLabels(nn.Module):
    """No prepare method: it returns `processed_labels` itself."""

    def forward(self, labels):
        processed = torch.cat([torch.full((labels.shape[0], 2), -100), labels], dim=1)
        return {"logits": torch.zeros(*processed.shape, 4), "processed_labels": processed}


def test_labels_returned_by_a_model_without_prepare_method_are_remembered():
    model = _AlignedReturnsLabels()
    _remember_processed_labels(torch.zeros(1, 1, dtype=torch.long))
    with expose_processed_labels(model):
        outputs = model(torch.tensor([[5]]))
    assert _is_processed_labels(outputs["processed_labels"].detach())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_nested_forwards_leave_the_outer_labels_remembered():
    model, batch = _tiny_llava(), _batch()
    inner = _AlignedReturnsLabels()
    expose_inner = expose_processed_labels(inner)
    inner_labels = []

    def run_inner(module, args, kwargs):
        inner_labels.append(inner(torch.tensor([[1]]))["processed_labels"])

    hook = model.register_forward_pre_hook(run_inner, with_kwargs=True)
    with expose_processed_labels(model):
        outer = model(**batch).processed_labels
    hook.remove()
    expose_inner.remove()
    assert _is_processed_labels(outer) and not _is_processed_labels(inner_labels[0])


# --------------------------------------------------------------------------------------------
# Missing images: one clear error on every path
# --------------------------------------------------------------------------------------------


def _without_images(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "images"}


@pytest.mark.parametrize("run", [aligned_forward, aligned_hidden_states])
def test_aligned_paths_say_the_images_are_missing(run):
    model, batch = _tiny_llava(), _batch()
    assert run(model, batch) is not None  # the batch with its images runs
    with pytest.raises(ValueError) as error:
        run(model, _without_images(batch))
    message = str(error.value)
    assert "-200" in message and "no image/video tensor reached" in message
    assert "['attention_mask', 'input_ids', 'labels']" in message  # the keys received
    assert "'images'" in message  # the argument forward takes
    assert "collate function" in message and "remove_unused_columns" not in message
    assert _no_shadowing_attribute(model) and labels_module._recordings.stack == []


def test_text_only_batches_and_uint8_images_are_not_rejected():
    model, batch = _tiny_llava(), _batch()
    text_only = make_multimodal_batch([[1, 7], [1, 8]], [[5, 2], [4, 2]])
    assert aligned_forward(model, text_only).labels is not None
    raw = dict(batch, images=(batch["images"] * 255).to(torch.uint8))
    with hf_expose_processed_labels(model):
        assert model(**raw).processed_labels.shape == (3, 13)
    assert aligned_forward(model, raw).labels.shape == (3, 13)


def test_exposed_forwards_name_the_likely_cause_of_their_path():
    model, batch = _tiny_llava(), _without_images(_batch())
    with hf_expose_processed_labels(model), pytest.raises(ValueError, match="remove_unused"):
        model(**batch)
    with expose_processed_labels(model), pytest.raises(ValueError, match="collate function"):
        model(**batch)
    assert not any(getattr(model, d) for d in HOOK_DICTS)
    assert labels_module._recordings.stack == [] and labels_module._installed == {}
