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


# ---- the real LLaVA family's signatures, on the tiny LLaVA-style model --------------------------
# Written from the signatures of haotian-liu/LLaVA (`LlavaLlamaForCausalLM`) and LLaVA-VL/LLaVA-NeXT
# (`LlavaQwenForCausalLM`, `llava_arch.py`), not from their code: what the library may pass them is
# what these tests keep honest.


def _parent_cache_name() -> str:
    """The argument under which this transformers' Llama takes a KV cache."""
    import inspect

    from transformers import LlamaForCausalLM

    return (
        "cache"
        if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
        else ("past_key_values")
    )


def llava_signature_model(**overrides):
    """LLaVA's ``forward``: explicit arguments, no ``**kwargs``, no ``cache``/``logits_to_keep``
    (which its parent ``LlamaForCausalLM.forward`` takes in transformers 5); and LLaVA's image
    convention (a row without a placeholder consumes an image it does not use)."""
    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config

    class LlavaSignatureForCausalLM(TinyLlavaForCausalLM):
        def prepare_inputs_labels_for_multimodal(
            self,
            input_ids,
            position_ids,
            attention_mask,
            past_key_values,
            labels,
            images,
            image_sizes=None,
        ):
            """LLaVA's convention: every row consumes images in reading order, one per
            placeholder, and a row without a placeholder one image whose features it leaves
            unused (LLaVA's data loader gives text-only rows a zero image, so that the vision
            tower runs on every batch, which ZeRO-3 needs on every process)."""
            if images is None or input_ids.shape[1] == 1:
                return super().prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, None
                )
            keep = torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is not None:
                keep = attention_mask.bool()
            placeholders = ((input_ids == self.config.image_token_index) & keep).sum(1).tolist()
            used, next_image = [], 0
            for count in placeholders:
                used += range(next_image, next_image + count)
                next_image += max(count, 1)
            features = self.encode_images(images)  # every image: one vision call per batch
            own = vars(self).get("encode_images")
            self.encode_images = lambda _: features[used]
            try:
                return super().prepare_inputs_labels_for_multimodal(
                    input_ids,
                    position_ids,
                    attention_mask,
                    past_key_values,
                    labels,
                    images[used],
                )
            finally:
                if own is None:
                    del self.encode_images
                else:
                    self.encode_images = own

        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            position_ids=None,
            past_key_values=None,
            inputs_embeds=None,
            labels=None,
            use_cache=None,
            output_attentions=None,
            output_hidden_states=None,
            images=None,
            image_sizes=None,
            return_dict=None,
        ):
            if inputs_embeds is None:
                (
                    input_ids,
                    position_ids,
                    attention_mask,
                    past_key_values,
                    inputs_embeds,
                    labels,
                ) = self.prepare_inputs_labels_for_multimodal(
                    input_ids,
                    position_ids,
                    attention_mask,
                    past_key_values,
                    labels,
                    images,
                    image_sizes,
                )
            return super(TinyLlavaForCausalLM, self).forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                **{_parent_cache_name(): past_key_values},
            )

    torch.manual_seed(0)
    return LlavaSignatureForCausalLM(tiny_llava_config(**overrides)).eval()


def llava_next_signature_model(anyres: bool = True, **overrides):
    """LLaVA-NeXT's signatures: ``prepare_inputs_labels_for_multimodal(input_ids, position_ids,
    attention_mask, past_key_values, labels, images, modalities=["image"], image_sizes=None)``
    (``modalities`` before ``image_sizes``), a ``forward`` with ``modalities``, ``dpo_forward`` and
    ``cache_position`` and no ``**kwargs``. Like NeXT, the prepare method keeps one row per entry
    of ``modalities`` (its default, ``["image"]``, keeps one), and in ``anyres`` mode it needs each
    image's size (``image_sizes``), failing without them as NeXT's does."""
    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config

    class LlavaNextSignatureForCausalLM(TinyLlavaForCausalLM):
        def prepare_inputs_labels_for_multimodal(
            self,
            input_ids,
            position_ids,
            attention_mask,
            past_key_values,
            labels,
            images,
            modalities=["image"],  # noqa: B006 - NeXT's own default, the trap under test
            image_sizes=None,
        ):
            if images is not None and anyres and input_ids.shape[1] > 1:
                for index in range(images.shape[0]):
                    image_sizes[index]  # NeXT: TypeError: 'NoneType' object is not subscriptable
            result = super().prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, labels, images
            )
            if images is None or input_ids.shape[1] == 1:
                return result
            rows = len(modalities)  # NeXT zips the rows with `modalities`
            return tuple(
                value[:rows] if isinstance(value, torch.Tensor) and value.ndim >= 2 else value
                for value in result
            )

        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            position_ids=None,
            past_key_values=None,
            inputs_embeds=None,
            labels=None,
            use_cache=None,
            output_attentions=None,
            output_hidden_states=None,
            images=None,
            image_sizes=None,
            return_dict=None,
            modalities=["image"],  # noqa: B006
            dpo_forward=False,
            cache_position=None,
        ):
            if inputs_embeds is None:
                (
                    input_ids,
                    position_ids,
                    attention_mask,
                    past_key_values,
                    inputs_embeds,
                    labels,
                ) = self.prepare_inputs_labels_for_multimodal(
                    input_ids,
                    position_ids,
                    attention_mask,
                    past_key_values,
                    labels,
                    images,
                    modalities,
                    image_sizes,
                )
            return super(TinyLlavaForCausalLM, self).forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                **{_parent_cache_name(): past_key_values},
            )

    torch.manual_seed(0)
    return LlavaNextSignatureForCausalLM(tiny_llava_config(**overrides)).eval()
