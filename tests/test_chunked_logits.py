"""logits_chunk_size: the same metrics as the full forward, never more than chunk x V logits."""

from __future__ import annotations

import pytest
import torch
from _models import (
    LLAVA_IMAGE_TOKEN,
    hf_llava_expands_inside,
    qwen2_vl_batch,
    tiny_hf_llava,
    tiny_llama,
    tiny_qwen2_vl,
)
from _reference import favour_token
from torch import nn
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from mllm_metrics.demo import TinyLlavaForCausalLM, make_multimodal_batch, tiny_llava_config  # noqa: E402
from mllm_metrics.labels import aligned_forward, aligned_hidden_states  # noqa: E402
from mllm_metrics.lightning import MultimodalLMModule  # noqa: E402


class SpyHead(nn.Linear):
    """An output head that records how many positions each call received."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__(head.in_features, head.out_features, bias=head.bias is not None)
        self.load_state_dict(head.state_dict())
        self.rows: list[int] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.rows.append(hidden.shape[:-1].numel())
        return super().forward(hidden)


def _tiny_llava(**overrides):
    torch.manual_seed(0)
    return favour_token(TinyLlavaForCausalLM(tiny_llava_config(**overrides))).eval()


def _llava_batches():
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        answers = [
            torch.tensor([5, 5, 9])[torch.randint(3, (int(n),), generator=generator)].tolist()
            for n in torch.randint(1, 5, (3,), generator=generator)
        ]
        images = torch.rand(3, 1, 8, 8, generator=generator)
        batches.append(
            make_multimodal_batch([[1, -200, 7], [1, 8], [-200, 9, -200]], answers, images)
        )
    return batches


def _hf_llava():
    if hf_llava_expands_inside():
        pytest.skip("transformers 4.x Llava merges image features inside forward: not splittable")
    model = favour_token(tiny_hf_llava(), bias=0.5)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        words = torch.tensor([5, 5, 9])[torch.randint(3, (2, 7), generator=generator)]
        image = torch.full((2, 4), LLAVA_IMAGE_TOKEN)
        input_ids = torch.cat([words[:, :1], image, words[:, 1:]], 1)
        labels = input_ids.clone()
        labels[:, :6] = -100
        batches.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "pixel_values": torch.randn(2, 3, 8, 8, generator=generator),
            }
        )
    return model, batches


def _llama():
    model = tiny_llama()
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        input_ids = torch.randint(16, (4, 6), generator=generator)
        labels = input_ids.clone()
        labels[:, :2] = -100
        batches.append({"input_ids": input_ids, "labels": labels})
    return model, batches


def _qwen2_vl():
    if not hasattr(transformers, "Qwen2VLForConditionalGeneration"):
        pytest.skip("this transformers release has no Qwen2-VL")
    model = favour_token(tiny_qwen2_vl(), bias=0.5)
    generator = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(2):
        answers = [
            torch.tensor([5, 5, 9])[torch.randint(3, (int(n),), generator=generator)].tolist()
            for n in torch.randint(1, 5, (3,), generator=generator)
        ]
        batches.append(qwen2_vl_batch(generator, answers))
    return model, batches


CASES = {
    "llava-style-right": lambda: (_tiny_llava(), _llava_batches()),
    "llava-style-left-truncated": lambda: (
        _tiny_llava(tokenizer_padding_side="left", tokenizer_model_max_length=10),
        _llava_batches(),
    ),
    "hf-llava": _hf_llava,
    "llama": _llama,
    "qwen2-vl": _qwen2_vl,
}


def _validate(model, batches, chunk):
    module = MultimodalLMModule(model, logits_chunk_size=chunk)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    [results] = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_states_times_head_are_the_logits(case):
    model, batches = CASES[case]()
    for batch in batches:
        with torch.no_grad():
            full = aligned_forward(model, batch)
            split = aligned_hidden_states(model, batch)
        assert split is not None
        assert torch.equal(split.labels, full.labels)
        torch.testing.assert_close(split.output_head(split.hidden_states), full.logits)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_metrics_equal_the_full_forward(case, chunk):
    model, batches = CASES[case]()
    full = _validate(model, batches, None)
    spy = SpyHead(model.get_output_embeddings())
    model.set_output_embeddings(spy)
    chunked = _validate(model, batches, chunk)
    assert chunked.keys() == full.keys()
    for name, value in full.items():
        tolerance = 1e-6 if name.endswith("loss") else 0
        assert chunked[name] == pytest.approx(value, rel=tolerance, abs=tolerance), name
    assert spy.rows and max(spy.rows) <= chunk  # the head never saw more than `chunk` positions


def test_models_that_cannot_be_split_fall_back_with_a_warning():
    class ReturnsItsLabels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _llama()[0]

        def forward(self, input_ids, labels):
            outputs = self.inner(input_ids=input_ids, labels=labels)
            outputs["processed_labels"] = labels
            return outputs

    model, batches = ReturnsItsLabels(), _llama()[1]
    with pytest.warns(UserWarning, match="cannot be run up to its hidden states"):
        chunked = _validate(model, batches, 4)
    assert chunked == _validate(model, batches, None)


def test_bad_chunk_size_is_rejected():
    with pytest.raises(ValueError, match="positive int"):
        MultimodalLMModule(nn.Linear(1, 1), logits_chunk_size=0)
