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
