"""MultimodalLMModule behaves as a LightningModule: hyper-parameters in checkpoints,
``trainer.predict`` and the progress bar."""

from __future__ import annotations

import pytest
import torch
from _models import tiny_llama
from _reference import processed_labels_by_hand
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

from mllm_metrics.demo import (  # noqa: E402
    TinyLlavaForCausalLM,
    make_multimodal_batch,
    tiny_llava_config,
)
from mllm_metrics.lightning import MultimodalLMModule  # noqa: E402


def _trainer(**kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return pl.Trainer(**(options | kwargs))


def _llava_batches(count: int = 2):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = torch.rand(2, 1, 8, 8, generator=generator)
        batches.append(make_multimodal_batch([[1, -200, 7], [-200, 8]], [[5, 9], [5]], images))
    return batches


def _tiny_llava(**overrides):
    torch.manual_seed(0)
    return TinyLlavaForCausalLM(tiny_llava_config(**overrides))


def test_checkpoints_hold_the_plain_arguments(tmp_path):
    module = MultimodalLMModule(
        _tiny_llava().train(),
        learning_rate=3e-3,
        weight_decay=0.25,
        text_alphabet="01",
        logits_chunk_size=5,
    )
    assert "model" not in module.hparams and "tokenizer" not in module.hparams
    loader = DataLoader(_llava_batches(), batch_size=None)
    trainer = _trainer(max_steps=1, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    restored = MultimodalLMModule.load_from_checkpoint(path, model=_tiny_llava())
    assert restored.learning_rate == 3e-3 and restored.weight_decay == 0.25
    assert restored.text_alphabet == "01" and restored.logits_chunk_size == 5
    optimizer = restored.configure_optimizers()
    assert optimizer.defaults["lr"] == 3e-3 and optimizer.defaults["weight_decay"] == 0.25


@pytest.mark.parametrize("chunk", [None, 3])
def test_predict_returns_shifted_argmax_ids_and_processed_labels(chunk):
    model, batches = _tiny_llava().eval(), _llava_batches()
    outputs = _trainer().predict(
        MultimodalLMModule(model, logits_chunk_size=chunk), DataLoader(batches, batch_size=None)
    )
    assert len(outputs) == len(batches)
    for output, batch in zip(outputs, batches, strict=True):
        with torch.no_grad():
            logits = model(**batch).logits
        assert torch.equal(output["preds"], logits[:, :-1].argmax(-1))
        assert torch.equal(output["target"], processed_labels_by_hand(model, batch)[:, 1:])


def test_predict_without_labels_gives_ids_only():
    model = tiny_llama()
    input_ids = torch.randint(16, (3, 5), generator=torch.Generator().manual_seed(1))
    [output] = _trainer().predict(
        MultimodalLMModule(model), DataLoader([{"input_ids": input_ids}], batch_size=None)
    )
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits[:, :-1].argmax(-1)
    assert output["target"] is None and torch.equal(output["preds"], expected)


def test_the_progress_bar_shows_bit_match_and_exact_match():
    trainer = _trainer()
    trainer.validate(
        MultimodalLMModule(_tiny_llava().eval()),
        DataLoader(_llava_batches(), batch_size=None),
        verbose=False,
    )
    assert {"val/loss", "val/bit_match", "val/exact_match"} <= set(trainer.progress_bar_metrics)
