"""Demo pieces: a tiny LLaVA-style model whose ``forward`` rewrites the labels."""

from mllm_metrics.demo.model import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TinyLlavaConfig,
    TinyLlavaForCausalLM,
    make_multimodal_batch,
    tiny_llava_config,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "TinyLlavaConfig",
    "TinyLlavaForCausalLM",
    "make_multimodal_batch",
    "tiny_llava_config",
]
