"""The processed-labels mechanism: preference order, restoration, nesting, threads, wrappers."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from _reference import processed_labels_by_hand
from torch import nn

from mllm_metrics.labels import (
    PREPARE_METHOD,
    aligned_forward,
    expose_processed_labels,
)

transformers = pytest.importorskip("transformers")
from mllm_metrics.demo import (  # noqa: E402
    TinyLlavaForCausalLM,
    make_multimodal_batch,
    tiny_llava_config,
)


def _tiny_llava(**overrides) -> TinyLlavaForCausalLM:
    torch.manual_seed(0)
    return TinyLlavaForCausalLM(tiny_llava_config(**overrides)).eval()


def _batch():
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return make_multimodal_batch(
        [[1, -200, 7], [1, 8], [-200, 9, -200]], [[5, 6, 2], [4, 2], [3, 3, 3, 2]], images
    )


def _has_no_wrapper(model: nn.Module) -> bool:
    return all(PREPARE_METHOD not in module.__dict__ for module in model.modules())


def test_llava_style_labels_are_recorded_from_forward():
    model, batch = _tiny_llava(), _batch()
    result = aligned_forward(model, batch)
    expected = processed_labels_by_hand(model, batch)
    assert batch["labels"].shape == (3, 7) and result.logits.shape[:2] == (3, 13)
    assert torch.equal(result.labels, expected)
    loss = F.cross_entropy(
        result.logits[:, :-1].reshape(-1, result.logits.shape[-1]), expected[:, 1:].reshape(-1)
    )
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert _has_no_wrapper(model)  # the model is restored after the call
    assert type(model) is TinyLlavaForCausalLM


def test_labels_follow_truncation_and_left_padding():
    model = _tiny_llava(tokenizer_model_max_length=6, tokenizer_padding_side="left")
    batch = _batch()
    result = aligned_forward(model, batch)
    expected = processed_labels_by_hand(model, batch, max_length=6, padding_side="left")
    assert expected[2].tolist() == [-100] * 6  # truncation cut every supervised label of row 3
    assert torch.equal(result.labels, expected)


class _ReturnsItsLabels(nn.Module):
    """Returns `processed_labels` itself and also has a prepare method that must not win."""

    def prepare_inputs_labels_for_multimodal(self, labels):
        return (torch.full_like(labels, 7),)

    def forward(self, labels):
        self.prepare_inputs_labels_for_multimodal(labels)
        processed = torch.cat([torch.full((labels.shape[0], 1), -100), labels], dim=1)
        return {"logits": torch.zeros(*processed.shape, 4), "processed_labels": processed}


def test_labels_returned_by_the_model_come_first():
    labels = torch.tensor([[1, 2]])
    result = aligned_forward(_ReturnsItsLabels(), {"labels": labels})
    assert result.labels.tolist() == [[-100, 1, 2]]


class _DpoStyle(nn.Module):
    def forward(self, labels, dpo_forward=False):
        processed = torch.cat([torch.full((labels.shape[0], 2), -100), labels], dim=1)
        logits = torch.zeros(*processed.shape, 4)
        return (logits, processed) if dpo_forward else {"logits": logits}


def test_dpo_forward_pair_is_understood():
    result = aligned_forward(_DpoStyle(), {"labels": torch.tensor([[3]]), "dpo_forward": True})
    assert result.labels.tolist() == [[-100, -100, 3]] and result.loss is None


def test_already_aligned_models_use_the_batch_labels():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(32, (2, 5))
    labels = input_ids.clone()
    labels[:, :2] = -100
    result = aligned_forward(model, {"input_ids": input_ids, "labels": labels})
    assert result.labels is labels
    assert aligned_forward(model, {"input_ids": input_ids}).labels is None


def test_unalignable_labels_give_a_clear_error():
    with pytest.raises(ValueError) as error:
        aligned_forward(_DpoStyle(), {"labels": torch.tensor([[3, 4]])})
    message = str(error.value)
    assert "(1, 4, 4)" in message and "(1, 2)" in message
    assert "processed_labels" in message and PREPARE_METHOD in message


def test_outputs_without_logits_are_rejected():
    class NoLogits(nn.Module):
        def forward(self, labels):
            return {"loss": torch.tensor(0.0)}

    with pytest.raises(ValueError, match="logits of shape"):
        aligned_forward(NoLogits(), {"labels": torch.tensor([[1]])})


def test_the_wrapper_keeps_the_signature_visible():
    model = _tiny_llava()
    original = inspect.signature(model.prepare_inputs_labels_for_multimodal)
    seen = []
    real_forward = TinyLlavaForCausalLM.forward

    def spy_forward(self, *args, **kwargs):
        seen.append(inspect.signature(self.prepare_inputs_labels_for_multimodal))
        return real_forward(self, *args, **kwargs)

    TinyLlavaForCausalLM.forward = spy_forward
    try:
        aligned_forward(model, _batch())
    finally:
        TinyLlavaForCausalLM.forward = real_forward
    assert seen == [original]
    assert "images" in original.parameters


class _Recursing(nn.Module):
    """Its forward runs a second, inner model through aligned_forward mid-way."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def prepare_inputs_labels_for_multimodal(self, labels):
        return (torch.cat([torch.full((labels.shape[0], 1), -100), labels], dim=1),)

    def forward(self, labels):
        inner = aligned_forward(self.inner, {"labels": labels + 10})
        assert inner.labels.tolist() == [[-100, -100, 11]]
        (processed,) = self.prepare_inputs_labels_for_multimodal(labels)
        return {"logits": torch.zeros(*processed.shape, 4)}


class _Inner(nn.Module):
    def prepare_inputs_labels_for_multimodal(self, labels):
        return (torch.cat([torch.full((labels.shape[0], 2), -100), labels], dim=1),)

    def forward(self, labels):
        (processed,) = self.prepare_inputs_labels_for_multimodal(labels)
        return {"logits": torch.zeros(*processed.shape, 4)}


def test_nested_forwards_keep_their_own_labels():
    outer = _Recursing(_Inner())
    result = aligned_forward(outer, {"labels": torch.tensor([[1]])})
    assert result.labels.tolist() == [[-100, 1]]
    assert _has_no_wrapper(outer)


def test_concurrent_threads_keep_their_own_labels():
    barrier = threading.Barrier(2, timeout=10)

    class Slow(_Inner):
        def prepare_inputs_labels_for_multimodal(self, labels):
            result = super().prepare_inputs_labels_for_multimodal(labels)
            barrier.wait()  # both threads are inside a forward at the same time
            return result

    model, results = Slow(), {}

    def run(value: int) -> None:
        results[value] = aligned_forward(model, {"labels": torch.tensor([[value]])}).labels

    threads = [threading.Thread(target=run, args=(value,)) for value in (3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {k: v.tolist() for k, v in results.items()} == {
        3: [[-100, -100, 3]],
        4: [[-100, -100, 4]],
    }
    assert _has_no_wrapper(model)


def test_expose_processed_labels_adds_a_field_and_undoes_itself():
    model, batch = _tiny_llava(), _batch()
    forward_signature = inspect.signature(model.forward)
    handle = expose_processed_labels(model)
    assert inspect.signature(model.forward) == forward_signature
    outputs = model(**batch)
    assert torch.equal(outputs.processed_labels, processed_labels_by_hand(model, batch))
    assert outputs.to_tuple()[-1] is outputs.processed_labels  # Trainer sees it in the tuple
    handle.remove()
    handle.remove()  # idempotent
    assert "processed_labels" not in model(**batch)
    assert _has_no_wrapper(model)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_expose_survives_a_forward_replaced_on_top():
    accelerate = pytest.importorskip("accelerate.utils")
    model, batch = _tiny_llava(), _batch()
    with expose_processed_labels(model):
        # What accelerate does for mixed precision: an instance attribute `forward` on top.
        model.forward = accelerate.convert_outputs_to_fp32(model.forward)
        assert "processed_labels" in model(**batch)
    assert "processed_labels" not in model(**batch)
    assert _has_no_wrapper(model) and not model._forward_hooks


def test_a_prepare_method_replaced_on_top_makes_the_wrapper_inert():
    # The wrapper exists only during a forward, so only code running inside one can replace it.
    from mllm_metrics import labels as labels_module

    model, batch = _tiny_llava(), _batch()
    expected = processed_labels_by_hand(model, batch)
    handle = expose_processed_labels(model)

    def replace(module, args):
        wrapped = module.prepare_inputs_labels_for_multimodal
        module.prepare_inputs_labels_for_multimodal = lambda *a, **k: wrapped(*a, **k)

    replacing = model.register_forward_pre_hook(replace)  # runs after the exposure's pre-hook
    with pytest.warns(UserWarning, match="was replaced"):
        outputs = model(**batch)
    replacing.remove()
    assert torch.equal(outputs.processed_labels, expected)  # this forward still recorded
    assert torch.equal(model(**batch).processed_labels, expected)  # a new wrapper on top
    handle.remove()
    with labels_module._recording() as slot:
        outputs = model(**batch)  # still runs through the left-over wrapper, which is inert
    assert "processed_labels" not in outputs and not slot.recorded


def test_expose_leaves_aligned_models_as_they_are():
    model, inputs = nn.Linear(2, 2), torch.ones(1, 2)
    expected = model(inputs)
    with expose_processed_labels(model):
        assert torch.equal(model(inputs), expected)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_a_failing_forward_leaves_nothing_behind():
    model = _tiny_llava()
    bad = _batch()
    bad["images"] = bad["images"][:1]  # fewer images than placeholders
    with expose_processed_labels(model), pytest.raises(ValueError):
        model(**bad)
    with pytest.raises(ValueError):
        aligned_forward(model, bad)
    from mllm_metrics import labels as labels_module

    assert labels_module._recordings.stack == []
    assert _has_no_wrapper(model)


def test_works_through_distributed_data_parallel(tmp_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        model = _tiny_llava()
        wrapped = nn.parallel.DistributedDataParallel(model)
        batch = _batch()
        result = aligned_forward(wrapped, batch)
        assert torch.equal(result.labels, processed_labels_by_hand(model, batch))
        with expose_processed_labels(wrapped):
            assert "processed_labels" in wrapped(**batch)
        assert _has_no_wrapper(model)
    finally:
        torch.distributed.destroy_process_group()


def test_labels_module_needs_no_transformers():
    code = (
        "import sys\n"
        "for name in ('transformers', 'lightning', 'pytorch_lightning'): sys.modules[name] = None\n"
        "import mllm_metrics.labels\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # torchmetrics imports transformers when installed, so block it only after torchmetrics.
    code = "import torchmetrics\n" + code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
