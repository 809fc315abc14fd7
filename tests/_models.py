"""Tiny models shared by the tests, built from configs with random weights (nothing downloaded)."""

from __future__ import annotations

import torch

LLAVA_IMAGE_TOKEN = 63


def tiny_llama(vocab_size: int = 16):
    """A one-layer ``LlamaForCausalLM``: a plain text model whose labels are already aligned."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def _llava_class():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def hf_llava_expands_inside() -> bool:
    """True for releases (4.37) whose Llava expands one `<image>` token inside forward."""
    return hasattr(_llava_class(), "_merge_input_ids_with_image_features")


def tiny_hf_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        num_channels=3,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    # 4.37 reads the padding side from `LlavaConfig.pad_token_id`.
    extra = {"pad_token_id": 0} if hf_llava_expands_inside() else {"image_seq_length": 4}
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=LLAVA_IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        **extra,
    )
    torch.manual_seed(0)
    return _llava_class()(config).eval()


QWEN_IMAGE_TOKEN, QWEN_VISION_START, QWEN_VISION_END = 60, 62, 63


def tiny_qwen2_vl():
    """A tiny ``Qwen2VLForConditionalGeneration`` (transformers >= 4.45), random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    vision = {
        "depth": 1,
        "embed_dim": 16,
        "hidden_size": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 2,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_IMAGE_TOKEN,
        video_token_id=61,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def qwen2_vl_batch(generator: torch.Generator, answers: list[list[int]]) -> dict:
    """A batch as Qwen2-VL's processor makes it: one 4x4 image per row (a 2x2 grid of merged
    patches, so 4 image tokens), right padding, labels only on the answers."""
    rows, labels = [], []
    for answer in answers:
        prompt = [1, QWEN_VISION_START] + [QWEN_IMAGE_TOKEN] * 4 + [QWEN_VISION_END, 7]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    label_tensor = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    patches = 16 * len(rows)  # (1 x 4 x 4) patches of 3 x 2 x 2 x 2 values per image
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": label_tensor,
        "pixel_values": torch.randn(patches, 24, generator=generator),
        "image_grid_thw": torch.tensor([[1, 4, 4]] * len(rows)),
        "mm_token_type_ids": (input_ids == QWEN_IMAGE_TOKEN).long(),
    }
