"""Streaming metrics for the stock ``transformers.Trainer``: no subclass, no overridden method.

A thin shell over the evaluation core (:mod:`mllm_metrics.evaluation`), in two parts:

- the model side, :func:`expose_processed_labels` (:mod:`mllm_metrics.hf.model`): the exposed
  model's evaluation forward sees each batch whole, on every process, and hands ``Trainer`` what
  the metrics need: ids and processed labels (never the logits), each row's NLL, group and
  greedy answer;
- the metric side, :class:`StreamingMetrics` (:mod:`mllm_metrics.hf.metrics`): its
  ``preprocess_logits`` (``preprocess_logits_for_metrics=``) aligns each prediction with its
  label before ``Trainer`` gathers, and the object itself (``compute_metrics=``) adds the
  gathered rows to the core's sums, once per batch with ``batch_eval_metrics=True``.

Usage::

    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    streaming = StreamingMetrics(group_key="task", groups=["vqa", "ocr"])
    expose_processed_labels(model, logits_chunk_size=256, metrics=streaming)
    args = TrainingArguments(..., batch_eval_metrics=True)
    trainer = Trainer(model, args, ..., compute_metrics=streaming,
                      preprocess_logits_for_metrics=streaming.preprocess_logits)
    trainer.evaluate()  # eval_bit_match, eval_exact_match, eval_nll, eval_bit_match/vqa, ...

Why ``eval_nll`` next to ``eval_loss``: ``Trainer``'s ``eval_loss`` is the mean over batches of
the model's per-batch loss. Since transformers 4.46 that loss is divided by
``num_items_in_batch``, which ``Trainer`` counts from the data set's labels; a LLaVA-style
``forward`` that truncates rows drops supervised labels, so the division uses too many tokens and
``eval_loss`` comes out too low. And a mean of per-batch means weights batches, not tokens.
``eval_nll`` is the summed token negative log-likelihood over the processed labels divided by
their number of supervised tokens, over the whole eval set: the token-weighted loss. ``eval_loss``
is left as ``Trainer`` computes it (the model's loss also drives training, so it is not touched).

This package does not import ``transformers``: it works with whatever ``Trainer`` calls it.
"""

from mllm_metrics.hf.fields import TRAINER_PAD_INDEX
from mllm_metrics.hf.metrics import StreamingMetrics
from mllm_metrics.hf.model import IGNORED_OUTPUT_KEYS, ChunkedEvalOutput, expose_processed_labels

__all__ = [
    "IGNORED_OUTPUT_KEYS",
    "TRAINER_PAD_INDEX",
    "ChunkedEvalOutput",
    "StreamingMetrics",
    "expose_processed_labels",
]
