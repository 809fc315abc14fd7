"""The real LLaVA family's signatures and logit transforms: what the library passes a model is
decided from the method that will run, and the split never computes a different loss.

- LLaVA's ``forward`` takes explicit arguments (no ``**kwargs``, no ``cache``, no
  ``logits_to_keep``), though its parent in transformers 5 takes them: decoding must not pass
  them (it crashed with ``unexpected keyword argument 'logits_to_keep'``).
- LLaVA-NeXT's prepare method takes ``modalities`` before ``image_sizes``: called by position,
  the sizes landed in ``modalities`` and anyres failed on ``image_sizes=None``.
- Gemma 4 soft-caps its logits with ``text_config.final_logit_softcapping``: the split checked
  only the top-level config and gave the un-capped head's loss.
"""

from __future__ import annotations

import pytest
import torch
from _models import llava_next_signature_model, llava_signature_model
from _reference import favour_token

pytest.importorskip("transformers")
from mllm_metrics.demo import make_multimodal_batch  # noqa: E402
from mllm_metrics.forward import EvaluationForward  # noqa: E402
from mllm_metrics.generation import build_prompts, greedy_answers  # noqa: E402
from mllm_metrics.labels import aligned_forward, aligned_hidden_states  # noqa: E402

EOS = 2
PROMPTS = [[1, -200, 7], [1, -200, 9, 9, 4], [-200, 9, 3]]
ANSWERS = [[5, 5, 9, EOS], [5, 9, EOS], [9, 5, 5, EOS]]


def _images(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _reference(model, prompt, image, extra, max_new_tokens=6):
    """Greedy decoding, one row, the whole forward recomputed at every step."""
    answer = []
    for _ in range(max_new_tokens):
        batch = make_multimodal_batch([prompt + answer], [[]], image)
        batch |= extra
        token = int(model(**batch).logits[0, -1].argmax())
        answer.append(token)
        if token == EOS:
            break
    return answer


def _next_batch(batch, rows):
    extra = {"image_sizes": [(8, 8)] * rows, "modalities": ["image"] * rows}
    return batch | extra, extra


@pytest.mark.parametrize("which", ["llava", "llava-next"])
def test_greedy_answers_of_the_real_signatures_equal_the_reference(which):
    model = llava_signature_model() if which == "llava" else llava_next_signature_model()
    favour_token(model, token=EOS, bias=0.2)
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images())
    per_row = [{}, {}, {}]
    if which == "llava-next":
        batch, _ = _next_batch(batch, 3)
        per_row = [{"image_sizes": [(8, 8)], "modalities": ["image"]}] * 3
    with torch.no_grad():
        generated = greedy_answers(model, batch, build_prompts(batch), 6, [EOS])
    images = _images()
    expected = [
        _reference(model, prompt, images[i : i + 1], per_row[i]) for i, prompt in enumerate(PROMPTS)
    ]
    assert generated == expected
    assert {len(answer) for answer in generated} != {6}  # some rows ended at the end token


@pytest.mark.parametrize("which", ["llava", "llava-next"])
def test_the_split_and_the_full_forward_of_the_real_signatures_agree(which):
    model = llava_signature_model() if which == "llava" else llava_next_signature_model()
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images())
    if which == "llava-next":
        batch, _ = _next_batch(batch, 3)
    with torch.no_grad():
        full = aligned_forward(model, batch)
        split = aligned_hidden_states(model, batch)
        result, _ = EvaluationForward(logits_chunk_size=2)(model, batch)
    assert torch.equal(split.labels, full.labels)
    torch.testing.assert_close(split.logits(split.hidden_states), full.logits)
    assert torch.equal(result.target, full.labels[:, 1:])
    assert result.row_nll.sum().item() == pytest.approx(
        full.loss.item() * (full.labels[:, 1:] != -100).sum().item(), rel=1e-5
    )


def test_next_without_modalities_per_row_is_a_clear_error_not_one_row():
    # NeXT's prepare keeps one row per entry of `modalities`, whose default has one entry: the
    # other rows would silently count in no metric.
    model = llava_next_signature_model()
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images()) | {"image_sizes": [(8, 8)] * 3}
    with pytest.raises(ValueError, match="3 rows.*has 1.*modalities"):
        EvaluationForward(logits_chunk_size=2)(model, batch)
    with pytest.raises(ValueError, match="3 rows.*has 1.*modalities"):
        aligned_forward(model, batch)


def test_next_anyres_needs_the_image_sizes_and_gets_them_by_name():
    model = llava_next_signature_model()
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images())
    batch["modalities"] = ["image"] * 3
    with pytest.raises(TypeError, match="not subscriptable"):  # the model's own failure
        model(**batch)
    batch["image_sizes"] = [(8, 8)] * 3  # then decoding passes them as `image_sizes`
    with torch.no_grad():
        greedy_answers(model, batch, build_prompts(batch), 2, [EOS])


# ---- logit transforms --------------------------------------------------------------------------


def _gemma4(cap: float):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma4ForConditionalGeneration"):
        pytest.skip("this transformers release has no Gemma 4")
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        max_position_embeddings=256,
        final_logit_softcapping=cap,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
    )
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=120,
        video_token_id=121,
        boi_token_id=122,
        eoi_token_id=123,
        audio_token_id=124,
        boa_token_id=125,
        eoa_token_index=126,
    )
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # logits of about 16, far beyond the cap of 2: the cap matters
        model.model.language_model.norm.weight.mul_(40.0)
    return model


def test_gemma4s_soft_cap_in_its_text_config_is_applied_by_the_split():
    model = _gemma4(cap=2.0)
    assert getattr(model.config, "final_logit_softcapping", None) is None  # only in text_config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 100, (2, 8), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    with torch.no_grad():
        own = model(**batch)
        split = aligned_hidden_states(model, batch)
        result, _ = EvaluationForward(logits_chunk_size=3)(model, batch)
    torch.testing.assert_close(split.logits(split.hidden_states), own.logits)
    supervised = (labels[:, 1:] != -100).sum().item()
    # The model's own loss: the capped logits' (about 5.8 here; the un-capped head's is 11.3).
    assert result.row_nll.sum().item() / supervised == pytest.approx(own.loss.item(), rel=1e-5)
    uncapped = torch.nn.functional.cross_entropy(
        split.output_head(split.hidden_states)[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
    )
    assert uncapped.item() > 1.5 * own.loss.item()  # the cap makes the test able to fail


def test_a_transform_the_split_cannot_reproduce_falls_back_to_the_models_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm_metrics import MllmMetricsWarning

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.logits_scaling = 4.0  # e.g. Granite divides its logits by it
    input_ids = torch.randint(32, (2, 6), generator=torch.Generator().manual_seed(1))
    assert aligned_hidden_states(model, {"input_ids": input_ids, "labels": input_ids}) is None
    with pytest.warns(MllmMetricsWarning, match="cannot be run up to its hidden states"):
        EvaluationForward(logits_chunk_size=2)(model, {"input_ids": input_ids, "labels": input_ids})
