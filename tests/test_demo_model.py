"""Tests for the tiny LLaVA-style demo model, against a brute-force per-row construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from mllm_metrics.demo import (  # noqa: E402
    TinyLlavaConfig,
    TinyLlavaForCausalLM,
    make_multimodal_batch,
    tiny_llava_config,
)

IMG = -200
N = 4  # (8 // 4) ** 2 feature positions per image with the default tiny config


def _model(**overrides) -> TinyLlavaForCausalLM:
    torch.manual_seed(0)
    return TinyLlavaForCausalLM(tiny_llava_config(**overrides)).eval()


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))


def _image_features(model: TinyLlavaForCausalLM, images: torch.Tensor) -> torch.Tensor:
    """Patch-by-patch: conv at one patch = dot product, then the projector; row-major order."""
    conv, proj, p = model.vision_tower, model.mm_projector, model.config.patch_size
    out = torch.empty(len(images), N, model.config.hidden_size)
    for k, img in enumerate(images):
        for r in range(8 // p):
            for c in range(8 // p):
                patch = img[:, r * p : (r + 1) * p, c * p : (c + 1) * p]
                vec = (conv.weight * patch).sum(dim=(1, 2, 3)) + conv.bias
                out[k, r * (8 // p) + c] = vec @ proj.weight.T + proj.bias
    return out


def _expected(model, input_ids, attention_mask, labels, images):
    """Brute force in plain Python: (embeds, labels, mask, position_ids) of the processed batch."""
    cfg = model.config
    feats = _image_features(model, images)
    table = model.get_input_embeddings().weight
    rows, k = [], 0
    for i in range(input_ids.shape[0]):
        row = []  # (embedding, label)
        for t in range(input_ids.shape[1]):
            if attention_mask is not None and attention_mask[i, t] == 0:
                continue
            tok = int(input_ids[i, t])
            lab = -100 if labels is None else int(labels[i, t])
            if tok == IMG:
                row += [(feats[k, j], -100) for j in range(N)]
                k += 1
            else:
                row.append((table[tok], lab))
        if cfg.tokenizer_model_max_length is not None:
            row = row[: cfg.tokenizer_model_max_length]
        rows.append(row)
    width = max(len(r) for r in rows)
    emb = torch.zeros(len(rows), width, cfg.hidden_size)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        off = 0 if cfg.tokenizer_padding_side == "right" else width - len(row)
        for j, (e, y) in enumerate(row):
            emb[i, off + j], lab[i, off + j], mask[i, off + j], pos[i, off + j] = e, y, 1, j
    return emb, lab, mask, pos


# Row 0: one image; row 1: no image; row 2: two images (one mid-prompt).
PROMPTS = [[1, IMG, 5, 6], [1, 7], [1, IMG, 8, IMG, 9]]
ANSWERS = [[10, 11, 2], [12, 13, 2], [16, 17, 18, 19, 2]]


def _check(model, batch, *, with_labels=True, with_mask=True, with_pos=True):
    ids, mask, labels, images = (
        batch[k] for k in ("input_ids", "attention_mask", "labels", "images")
    )
    pos_in = torch.arange(ids.shape[1]).expand_as(ids) if with_pos else None
    with torch.no_grad():
        out = model.prepare_inputs_labels_for_multimodal(
            ids,
            pos_in,
            mask if with_mask else None,
            None,
            labels if with_labels else None,
            images,
        )
        exp_emb, exp_lab, exp_mask, exp_pos = _expected(
            model, ids, mask if with_mask else None, labels if with_labels else None, images
        )
    new_ids, pos, new_mask, pkv, emb, new_labels = out
    assert new_ids is None and pkv is None
    torch.testing.assert_close(emb, exp_emb)
    if with_labels:
        assert torch.equal(new_labels, exp_lab)
    else:
        assert new_labels is None
    if with_mask:
        assert new_mask.dtype == mask.dtype
        assert torch.equal(new_mask, exp_mask)
    else:
        assert new_mask is None
    if with_pos:
        assert torch.equal(pos, exp_pos)
    else:
        assert pos is None
    return out


def test_right_padding_mixed_rows():
    model = _model()
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images(3))
    _, _, mask, _, emb, labels = _check(model, batch)
    # By hand: row 2 = 5 prompt tokens - 2 placeholders + 2 * 4 image positions + 5 answer ids.
    assert batch["input_ids"].shape == (3, 10)
    assert emb.shape == (3, 16, 32)
    assert mask.sum(1).tolist() == [10, 5, 16]
    assert labels[0].tolist() == [-100] * 7 + [10, 11, 2] + [-100] * 6
    assert labels[1].tolist() == [-100] * 2 + [12, 13, 2] + [-100] * 11
    assert labels[2].tolist() == [-100] * 11 + [16, 17, 18, 19, 2]


@pytest.mark.parametrize("input_side", ["right", "left"])
def test_left_padding(input_side):
    model = _model(tokenizer_padding_side="left")
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images(3), padding_side=input_side)
    _, pos, mask, _, emb, labels = _check(model, batch)
    assert mask[1].tolist() == [0] * 11 + [1] * 5
    assert pos[1].tolist() == [0] * 11 + list(range(5))
    assert labels[1].tolist() == [-100] * 13 + [12, 13, 2]
    assert emb[1, :11].abs().sum() == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_cuts_supervised_labels(side):
    model = _model(tokenizer_model_max_length=9, tokenizer_padding_side=side)
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images(3))
    _, _, mask, _, _, labels = _check(model, batch)
    assert labels.shape == (3, 9)
    assert mask.sum(1).tolist() == [9, 5, 9]
    assert labels[0].tolist() == [-100] * 7 + [10, 11]  # the answer's last token is cut
    assert (labels[2] == -100).all()  # the whole answer is cut


def test_labels_none_and_attention_mask_none():
    model = _model()
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images(3))
    _check(model, batch, with_labels=False)
    _check(model, batch, with_pos=False)
    # Without a mask, padding tokens (id 0) are real tokens: each row keeps its full width.
    _, _, _, _, emb, labels = _check(model, batch, with_mask=False)
    assert emb.shape[1] == 10 - 2 + 2 * N


def test_text_only_batch_and_images_none():
    model = _model()
    batch = make_multimodal_batch([[1, 3], [1]], [[4, 2], [5, 6, 2]])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    out = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, None)
    assert out[0] is ids and out[2] is mask and out[5] is labels and out[4] is None
    logits = model(**batch).logits
    assert logits.shape == (2, 4, 64)


def test_image_count_mismatch_raises():
    model = _model()
    with pytest.raises(ValueError, match=r"2 image\(s\) for 3 placeholder"):
        model(**make_multimodal_batch(PROMPTS, ANSWERS, _images(2)))
    with pytest.raises(ValueError, match=r"4 image\(s\) for 3 placeholder"):
        model(**make_multimodal_batch(PROMPTS, ANSWERS, _images(4)))
    with pytest.raises(ValueError, match="num_images, C, H, W"):
        model(**make_multimodal_batch(PROMPTS, ANSWERS, torch.rand(3, 8, 8)))
    with pytest.raises(ValueError, match="got list"):
        model(**make_multimodal_batch(PROMPTS, ANSWERS, list(_images(3))))


def test_placeholder_in_padding_is_ignored():
    model = _model()
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images(3))
    batch["input_ids"][1, -1] = IMG  # padded position: dropped, consumes no image
    _check(model, batch)


def test_forward_logits_loss_and_no_mutation():
    model = _model()
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images(3))
    before = {k: v.clone() for k, v in batch.items()}
    captured = []
    original = model.prepare_inputs_labels_for_multimodal

    def spy(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    model.prepare_inputs_labels_for_multimodal = spy  # the way other code captures labels
    out = model(**batch)
    assert len(captured) == 1
    processed = captured[0][5]
    _, exp_labels, _, _ = _expected(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"]
    )
    assert torch.equal(processed, exp_labels)
    assert out.logits.shape == (3, 16, 64)
    expected_loss = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 64), exp_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected_loss)
    assert "processed_labels" not in out
    for k, v in batch.items():
        assert torch.equal(v, before[k]), k
    out.loss.backward()
    assert model.mm_projector.weight.grad.abs().sum() > 0


def test_forward_with_inputs_embeds_skips_processing():
    model = _model()
    calls = []
    model.prepare_inputs_labels_for_multimodal = lambda *a, **k: calls.append(1)
    embeds = torch.randn(2, 5, 32)
    out = model(inputs_embeds=embeds, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert calls == [] and out.logits.shape == (2, 5, 64)


def _parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_default_config_is_tiny():
    # A LightningCLI config that said `TinyLlavaConfig()` built a 7B-sized Llama: build it on
    # the meta device (no memory), so that a regression fails here instead of being killed.
    with torch.device("meta"):
        model = TinyLlavaForCausalLM(TinyLlavaConfig())
    assert _parameters(model) < 1e6
    assert _parameters(model) == _parameters(TinyLlavaForCausalLM(tiny_llava_config()))
    assert TinyLlavaConfig().to_dict() == tiny_llava_config().to_dict()
    overrides = {"hidden_size": 48, "num_attention_heads": 4, "tokenizer_padding_side": "left"}
    assert TinyLlavaConfig(**overrides).to_dict() == tiny_llava_config(**overrides).to_dict()
    assert TinyLlavaConfig(**overrides).num_key_value_heads == 4  # follows the heads, as Llama


def test_default_config_survives_save_and_load(tmp_path):
    # save_pretrained writes only the fields that differ from TinyLlavaConfig()'s defaults.
    TinyLlavaConfig(hidden_size=48).save_pretrained(tmp_path)
    loaded = TinyLlavaConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == TinyLlavaConfig(hidden_size=48).to_dict()


def test_config_roundtrip(tmp_path):
    model = _model(tokenizer_model_max_length=12, tokenizer_padding_side="left")
    model.save_pretrained(tmp_path)
    loaded = TinyLlavaForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, TinyLlavaConfig)
    assert loaded.config.model_type == "tiny_llava"
    assert loaded.config.tokenizer_model_max_length == 12
    assert loaded.config.tokenizer_padding_side == "left"
    assert loaded.config.image_token_index == IMG
    batch = make_multimodal_batch(PROMPTS, ANSWERS, _images(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.lists(st.one_of(st.just(IMG), st.integers(3, 63)), max_size=5),
            st.lists(st.integers(3, 63), min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=4,
    ),
    side=st.sampled_from(["right", "left"]),
    input_side=st.sampled_from(["right", "left"]),
    max_len=st.one_of(st.none(), st.integers(1, 12)),
)
def test_matches_brute_force(rows, side, input_side, max_len):
    model = _model(tokenizer_padding_side=side, tokenizer_model_max_length=max_len)
    prompts = [[1, *p] for p, _ in rows]
    n_images = sum(p.count(IMG) for p in prompts)
    batch = make_multimodal_batch(
        prompts, [a for _, a in rows], _images(n_images), padding_side=input_side
    )
    _check(model, batch)
