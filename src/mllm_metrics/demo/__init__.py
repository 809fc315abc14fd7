"""Demo pieces: a tiny LLaVA-style model whose ``forward`` rewrites the labels, and the demo.

- :mod:`mllm_metrics.demo.model`: the model (``TinyLlavaForCausalLM``) and its batch builder;
- :mod:`mllm_metrics.demo.data`: the synthetic "read the bits in the image" task and its
  character-level tokenizer;
- :mod:`mllm_metrics.demo.config`: the options of a run (``DemoConfig``) and what it returns;
- :mod:`mllm_metrics.demo.runner`: the run (:func:`run_demo`), trained with Lightning or
  ``transformers.Trainer``;
- :mod:`mllm_metrics.demo.cli`: ``mllm-metrics demo`` (also ``python -m mllm_metrics.demo``).

The names below are imported on first use, so that ``mllm-metrics --help`` (which imports this
package) needs neither transformers nor Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mllm_metrics.demo.config import DemoConfig, DemoResult
    from mllm_metrics.demo.data import BitImageCollator, BitImageDataset, char_tokenizer
    from mllm_metrics.demo.model import (
        IGNORE_INDEX,
        IMAGE_TOKEN_INDEX,
        TinyLlavaConfig,
        TinyLlavaForCausalLM,
        make_multimodal_batch,
        tiny_llava_config,
    )
    from mllm_metrics.demo.runner import run_demo

_WHERE = {
    "IGNORE_INDEX": "model",
    "IMAGE_TOKEN_INDEX": "model",
    "BitImageCollator": "data",
    "BitImageDataset": "data",
    "DemoConfig": "config",
    "DemoResult": "config",
    "TinyLlavaConfig": "model",
    "TinyLlavaForCausalLM": "model",
    "char_tokenizer": "data",
    "make_multimodal_batch": "model",
    "run_demo": "runner",
    "tiny_llava_config": "model",
}

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
