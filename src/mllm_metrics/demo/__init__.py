"""Demo pieces: a tiny LLaVA-style model whose ``forward`` rewrites the labels, and the demo.

- :mod:`mllm_metrics.demo.model`: the model (``TinyLlavaForCausalLM``) and its batch builder;
- :mod:`mllm_metrics.demo.data`: the synthetic "read the bits in the image" task and its
  character-level tokenizer;
- :mod:`mllm_metrics.demo.cli`: ``mllm-metrics demo`` (also ``python -m mllm_metrics.demo``
  and :func:`run_demo`), trained with Lightning or ``transformers.Trainer``.
"""

from mllm_metrics.demo.cli import DemoConfig, DemoResult, run_demo
from mllm_metrics.demo.data import BitImageCollator, BitImageDataset, char_tokenizer
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
    "BitImageCollator",
    "BitImageDataset",
    "DemoConfig",
    "DemoResult",
    "TinyLlavaConfig",
    "TinyLlavaForCausalLM",
    "char_tokenizer",
    "make_multimodal_batch",
    "run_demo",
    "tiny_llava_config",
]
