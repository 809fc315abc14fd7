"""Streaming, DDP-exact validation metrics for multimodal LLMs whose forward rewrites the labels.

``import mllm_metrics`` needs only torch and torchmetrics; the Lightning module
(:mod:`mllm_metrics.lightning`) and the ``transformers.Trainer`` adapter (:mod:`mllm_metrics.hf`)
import their frameworks themselves.
"""

from mllm_metrics._warning import MllmMetricsWarning
from mllm_metrics.functional import causal_shift
from mllm_metrics.grouped import GroupedMetric
from mllm_metrics.metrics import (
    BitMatchAccuracy,
    ExactMatchAccuracy,
    GeneratedBitMatch,
    GeneratedExactMatch,
    TextBitMatchAccuracy,
    TextExactMatch,
    TokenNLL,
    causal_lm_metrics,
)

__all__ = [
    "BitMatchAccuracy",
    "ExactMatchAccuracy",
    "GeneratedBitMatch",
    "GeneratedExactMatch",
    "GroupedMetric",
    "MllmMetricsWarning",
    "TextBitMatchAccuracy",
    "TextExactMatch",
    "TokenNLL",
    "causal_lm_metrics",
    "causal_shift",
]
__version__ = "0.1.0"
