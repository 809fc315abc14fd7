"""MultimodalLMModule: logged values equal references computed independently."""

from __future__ import annotations

import math

import pytest
import torch
from _models import LLAVA_IMAGE_TOKEN, hf_llava_expands_inside, tiny_hf_llava, tiny_llama
from _reference import (
    brute_force_bit_match,
    brute_force_exact_match,
    favour_token,
    processed_labels_by_hand,
)
from torch import nn
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from mllm_metrics.demo import (  # noqa: E402
    TinyLlavaForCausalLM,
    make_multimodal_batch,
    tiny_llava_config,
)
from mllm_metrics.lightning import MultimodalLMModule  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
)


def _trainer(**kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return pl.Trainer(**(options | kwargs))


def _loader(batches) -> DataLoader:
    return DataLoader(batches, batch_size=None)  # the batches are already collated


def _tiny_llava(**overrides) -> TinyLlavaForCausalLM:
    torch.manual_seed(0)
    return favour_token(TinyLlavaForCausalLM(tiny_llava_config(**overrides))).eval()


def _llava_batches(seed: int = 0, count: int = 3):
    """Right-padded data-set batches: rows with 0, 1 and 2 images, answers of varied length."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        prompts = [[1, -200, 7], [1, 8], [-200, 9, -200, 3]]
        answers = [  # mostly the favoured token, so that some answers are right
            torch.tensor([5, 5, 9])[torch.randint(3, (int(n),), generator=generator)].tolist()
            for n in torch.randint(1, 5, (3,), generator=generator)
        ]
        images = torch.rand(3, 1, 8, 8, generator=generator)
        batches.append(make_multimodal_batch(prompts, answers, images))
    return batches


def _reference(model, batches, labels_for):
    """Brute-force metrics over all batches; `labels_for(batch, logits)` gives aligned labels."""
    correct = total = hits = counted = 0
    nll_sum, nll_tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            outputs = model(**batch)
            labels = labels_for(batch, outputs.logits)
            preds = outputs.logits[:, :-1].argmax(-1).tolist()
            target = labels[:, 1:].tolist()
            c, t = brute_force_bit_match(preds, target, -100)
            h, n = brute_force_exact_match(preds, target, -100)
            correct, total, hits, counted = correct + c, total + t, hits + h, counted + n
            # The model's own loss is a mean over this batch's supervised tokens.
            nll_sum += outputs.loss.item() * t
            nll_tokens += t
    return {
        "val/bit_match": correct / total,
        "val/exact_match": hits / counted if counted else 0.0,
        "val/loss": nll_sum / nll_tokens,
    }


def _assert_logged(results, expected):
    assert set(expected) <= set(results)
    assert 0 < max(v for k, v in expected.items() if "match" in k) < 1  # a non-trivial case
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="right-padding"),
        pytest.param({"tokenizer_padding_side": "left"}, id="left-padding"),
        pytest.param({"tokenizer_model_max_length": 9}, id="truncation-cuts-labels"),
    ],
)
def test_llava_style_model(overrides):
    model, batches = _tiny_llava(**overrides), _llava_batches()
    length = overrides.get("tokenizer_model_max_length")
    side = overrides.get("tokenizer_padding_side", "right")

    def labels_for(batch, logits):
        labels = processed_labels_by_hand(model, batch, max_length=length, padding_side=side)
        assert labels.shape == logits.shape[:2] != batch["labels"].shape
        return labels

    expected = _reference(model, batches, labels_for)
    [results] = _trainer().validate(MultimodalLMModule(model), _loader(batches), verbose=False)
    _assert_logged(results, expected)
    if length is not None:  # truncation dropped supervised labels: the data set's count is wrong
        dataset_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        processed = sum(
            int((labels_for(b, model(**b).logits)[:, 1:] != -100).sum()) for b in batches
        )
        assert processed < dataset_tokens


def test_hugging_face_llava():
    """transformers 5 expects the processor's expanded image tokens: labels are aligned as they
    come. transformers 4.37 expands one <image> token inside forward, in
    `_merge_input_ids_with_image_features`, whose labels are recorded."""
    expands_inside = hf_llava_expands_inside()
    model = favour_token(tiny_hf_llava(), bias=0.5)
    generator = torch.Generator().manual_seed(1)
    placeholders = 1 if expands_inside else 4
    batches = []
    for _ in range(2):
        words = torch.tensor([5, 5, 9])[torch.randint(3, (2, 7), generator=generator)]
        image = torch.full((2, placeholders), LLAVA_IMAGE_TOKEN)
        input_ids = torch.cat([words[:, :1], image, words[:, 1:]], 1)
        labels = input_ids.clone()
        labels[:, : 2 + placeholders] = -100  # the prompt and the image
        batches.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "attention_mask": torch.ones_like(labels),
                "pixel_values": torch.randn(2, 3, 8, 8, generator=generator),
            }
        )

    def labels_for(batch, logits):
        if not expands_inside:
            return batch["labels"]
        labels = batch["labels"]
        return torch.cat([labels[:, :1], torch.full((2, 4), -100), labels[:, 2:]], dim=1)

    expected = _reference(model, batches, labels_for)
    # 4.37's Llava merges the image features inside forward: it can only run whole (a
    # warning says so when chunking is asked for; see test_chunked_logits.py).
    module = MultimodalLMModule(model, logits_chunk_size=None if expands_inside else 256)
    [results] = _trainer().validate(module, _loader(batches), verbose=False)
    _assert_logged(results, expected)


def _text_batches(count: int = 3):
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(16, (4, 6), generator=generator)
        labels = input_ids.clone()
        labels[:, :3] = -100
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


def test_plain_text_llama():
    model, batches = tiny_llama(), _text_batches()
    expected = _reference(model, batches, lambda batch, logits: batch["labels"])
    [results] = _trainer().validate(MultimodalLMModule(model), _loader(batches), verbose=False)
    _assert_logged(results, expected)


class _RewritesLabels(nn.Module):
    """Rewrites labels like LLaVA (two -100 positions in front); may return them itself."""

    def __init__(self, returns_labels: bool = True) -> None:
        super().__init__()
        self.inner = tiny_llama()
        self.returns_labels = returns_labels

    def forward(self, input_ids, labels):
        input_ids = torch.cat([torch.zeros_like(input_ids[:, :2]), input_ids], dim=1)
        labels = torch.cat([torch.full_like(labels[:, :2], -100), labels], dim=1)
        outputs = self.inner(input_ids=input_ids, labels=labels)
        if self.returns_labels:
            outputs["processed_labels"] = labels
        return outputs


def test_model_that_returns_its_labels():
    model, batches = _RewritesLabels().eval(), _text_batches()

    def labels_for(batch, logits):
        return torch.cat([torch.full((4, 2), -100), batch["labels"]], dim=1)

    expected = _reference(model, batches, labels_for)
    # A wrapper without an output head of its own: only the full forward applies.
    module = MultimodalLMModule(model, logits_chunk_size=None)
    [results] = _trainer().validate(module, _loader(batches), verbose=False)
    _assert_logged(results, expected)


class _CharTokenizer:
    """Decodes id i to chr(ord('a') + i); ids 0 and 1 are special (dropped when asked)."""

    def batch_decode(self, sequences, skip_special_tokens=False):
        return [
            "".join(chr(ord("a") + i) for i in ids if not (skip_special_tokens and i < 2))
            for ids in sequences
        ]


@pytest.mark.parametrize("chunk", [None, 2])  # the full logits, and the supervised-only head
def test_text_metrics_with_a_tokenizer(chunk):
    model, batches = tiny_llama(), _text_batches()
    tokenizer = _CharTokenizer()
    text_correct = text_total = text_hits = text_count = 0
    with torch.no_grad():
        for batch in batches:
            preds = model(**batch).logits[:, :-1].argmax(-1)
            target = batch["labels"][:, 1:]
            for pred_row, target_row in zip(preds.tolist(), target.tolist()):
                pairs = [(p, t) for p, t in zip(pred_row, target_row) if t != -100]
                predicted = "".join(chr(97 + p) for p, _ in pairs if p >= 2)
                expected = "".join(chr(97 + t) for _, t in pairs if t >= 2)
                text_correct += sum(a == b for a, b in zip(predicted, expected))
                text_total += max(len(predicted), len(expected))
                text_hits += predicted == expected
                text_count += 1
    module = MultimodalLMModule(model, tokenizer=tokenizer, logits_chunk_size=chunk)
    [results] = _trainer().validate(module, _loader(batches), verbose=False)
    assert 0 < text_correct < text_total
    assert results["val/text_bit_match"] == pytest.approx(text_correct / text_total)
    assert results["val/text_exact_match"] == pytest.approx(text_hits / text_count)


def test_several_dataloaders_keep_separate_states_and_keys():
    model = _tiny_llava()
    first, second = _llava_batches(seed=0, count=2), _llava_batches(seed=5, count=1)
    labels_for = lambda batch, logits: processed_labels_by_hand(model, batch)  # noqa: E731
    module = MultimodalLMModule(model)
    results = _trainer().validate(module, [_loader(first), _loader(second)], verbose=False)
    for index, batches in enumerate((first, second)):
        expected = _reference(model, batches, labels_for)
        suffixed = {f"{name}/dataloader_idx_{index}": value for name, value in expected.items()}
        _assert_logged(results[index], suffixed)
    assert set(module.evaluations) == {"val_0", "val_1"}


def test_test_stage_logs_test_keys():
    model, batches = tiny_llama(), _text_batches()
    expected = _reference(model, batches, lambda batch, logits: batch["labels"])
    [results] = _trainer().test(MultimodalLMModule(model), _loader(batches), verbose=False)
    _assert_logged(results, {k.replace("val/", "test/"): v for k, v in expected.items()})


def test_two_validations_in_a_row_reset_the_states():
    model, batches = tiny_llama(), _text_batches()
    module, trainer = MultimodalLMModule(model), _trainer()
    [first] = trainer.validate(module, _loader(batches), verbose=False)
    [second] = trainer.validate(module, _loader(batches), verbose=False)
    assert first == second


def test_training_returns_and_logs_the_model_loss():
    model, batches = tiny_llama(), _text_batches()
    model.train()
    module = MultimodalLMModule(model, learning_rate=0.05, weight_decay=0.01)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["weight_decay"] == 0.01
    with pytest.warns(UserWarning, match="trainer` reference is not registered"):
        loss = module.training_step(batches[0], 0)  # called by hand: Lightning says so
    assert loss.item() == pytest.approx(model(**batches[0]).loss.item())
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(module, _loader(batches), _loader(batches))
    assert "train/loss" in trainer.callback_metrics and "val/bit_match" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unalignable_labels_give_a_clear_error():
    # It rewrites its labels (like LLaVA) but neither returns them nor uses a known method.
    with pytest.raises(ValueError) as error:
        _trainer().validate(
            MultimodalLMModule(_RewritesLabels(returns_labels=False), logits_chunk_size=None),
            _loader(_text_batches()),
        )
    message = str(error.value)
    assert "(4, 8, 16)" in message and "(4, 6)" in message
    assert "processed_labels" in message and "prepare_inputs_labels_for_multimodal" in message


def test_batches_without_labels_are_rejected():
    batches = [{"input_ids": batch["input_ids"]} for batch in _text_batches(1)]
    with pytest.raises(ValueError, match="no `labels`"):
        _trainer().validate(MultimodalLMModule(tiny_llama()), _loader(batches))


def test_custom_metrics_are_used():
    from torchmetrics.classification import MulticlassAccuracy

    model, batches = tiny_llama(), _text_batches()
    metric = MulticlassAccuracy(num_classes=16, average="micro", ignore_index=-100)
    module = MultimodalLMModule(model, metrics={"accuracy": metric})
    [results] = _trainer().validate(module, _loader(batches), verbose=False)
    expected = _reference(model, batches, lambda batch, logits: batch["labels"])
    assert results["val/accuracy"] == pytest.approx(expected["val/bit_match"])
    assert not math.isnan(results["val/loss"])


def test_a_metric_collection_keeps_its_keys():
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy

    model, batches = tiny_llama(), _text_batches()
    collection = MetricCollection(
        {"accuracy": MulticlassAccuracy(num_classes=16, average="micro", ignore_index=-100)}
    )
    [results] = _trainer().validate(
        MultimodalLMModule(model, metrics=collection), _loader(batches), verbose=False
    )
    assert set(results) == {"val/loss", "val/accuracy"}


def test_validate_then_fit_with_the_same_module():
    # Metrics created in validate() hold inference-mode tensors; fit's validation runs under
    # no_grad, where an in-place update of those tensors fails.
    model, batches = tiny_llama().train(), _text_batches()
    module, trainer = MultimodalLMModule(model), _trainer(max_epochs=1, limit_train_batches=2)
    [before] = trainer.validate(module, _loader(batches), verbose=False)
    trainer.fit(module, _loader(batches), _loader(batches))
    assert "val/bit_match" in trainer.callback_metrics and "val/bit_match" in before
