"""``MultimodalLMModule``: validate a multimodal LLM against the labels its logits align with."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import Metric, MetricCollection

from mllm_metrics.functional import causal_shift
from mllm_metrics.labels import AlignedHiddenStates, aligned_forward, aligned_hidden_states
from mllm_metrics.metrics import TextBitMatchAccuracy, TextExactMatch, TokenNLL, causal_lm_metrics

__all__ = ["MultimodalLMModule"]


class MultimodalLMModule(pl.LightningModule):
    """Train and validate a (multimodal) causal LM on the labels its logits really align with.

    A LLaVA-style ``forward`` rewrites the labels (image placeholders become many feature
    positions labelled -100, rows are re-padded and truncated), so the data set's labels no
    longer line up with the logits. At each validation/test step this module runs the model
    through :func:`mllm_metrics.labels.aligned_forward`, which recovers the *processed* labels,
    shifts them causally against the argmax predictions and updates the metrics. Nothing of
    vocabulary size outlives the step; the metric objects are logged, so Lightning syncs them
    across processes once per epoch and resets them.

    Logged keys (``test/...`` likewise): ``train/loss`` (the model's own loss, per step);
    ``val/loss`` (token-weighted mean NLL of the processed labels, see
    :class:`~mllm_metrics.TokenNLL`), ``val/bit_match``, ``val/exact_match``, and with a
    ``tokenizer`` also ``val/text_bit_match`` and ``val/text_exact_match``, computed on the
    decoded supervised spans (``skip_special_tokens=True``; rows without any supervised label
    are skipped, as in exact-match). With several dataloaders each has its own metric states and
    Lightning suffixes the keys with ``/dataloader_idx_N``.

    Under DDP, Lightning's ``DistributedSampler`` pads the eval set by repeating samples so that
    every process gets as many batches; the repeated samples are recognised from the sampler and
    their labels masked, so the synced values equal a single-process run exactly.

    Args:
        model: the model; called as ``model(**batch)`` with a dict batch that holds ``labels``.
        metrics: token metrics fed ``(preds, target)``: a ``Metric``, a ``MetricCollection``
            or a dict of metrics; default :func:`~mllm_metrics.causal_lm_metrics`. A copy is
            made for each stage and dataloader.
        tokenizer: a Hugging Face tokenizer (anything with ``batch_decode``) to add the text
            metrics.
        ignore_index: label value of unsupervised positions.
        text_alphabet: characters the text bit-match keeps (e.g. ``"01"``); None keeps all.
        learning_rate: AdamW learning rate of :meth:`configure_optimizers`.
        weight_decay: AdamW weight decay.
        logits_chunk_size: in validation/test, run the model up to its final hidden states and
            apply the output head to this many token positions at a time (counted across the
            whole batch), keeping only the argmax ids and the summed NLL of each chunk: at most
            ``logits_chunk_size x vocab_size`` logits are alive at once instead of
            ``batch x seq_len x vocab_size``. Values equal the full path. Models that cannot
            be split (see :func:`~mllm_metrics.labels.aligned_hidden_states`) fall back to the
            full forward with a warning.

    Example:
        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from mllm_metrics.demo import TinyLlavaForCausalLM, make_multimodal_batch
        >>> from mllm_metrics.demo import tiny_llava_config
        >>> model = TinyLlavaForCausalLM(tiny_llava_config())
        >>> batch = make_multimodal_batch([[1, -200, 5]], [[7, 8, 2]], torch.rand(1, 1, 8, 8))
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> loader = DataLoader([batch], batch_size=None)  # already collated
        >>> [results] = trainer.validate(MultimodalLMModule(model), loader, verbose=False)
        >>> sorted(results)
        ['val/bit_match', 'val/exact_match', 'val/loss']

    """

    def __init__(
        self,
        model: nn.Module,
        *,
        metrics: Metric | MetricCollection | Mapping[str, Metric] | None = None,
        tokenizer: Any = None,
        ignore_index: int = -100,
        text_alphabet: str | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        logits_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if logits_chunk_size is not None and (
            not isinstance(logits_chunk_size, int) or logits_chunk_size < 1
        ):
            raise ValueError(
                f"Expected `logits_chunk_size` to be a positive int or None, got "
                f"{logits_chunk_size!r}."
            )
        self.logits_chunk_size = logits_chunk_size
        if tokenizer is not None and not callable(getattr(tokenizer, "batch_decode", None)):
            raise TypeError(
                f"Expected a tokenizer with a `batch_decode` method (a Hugging Face tokenizer), "
                f"got {type(tokenizer).__name__}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.ignore_index = ignore_index
        self.text_alphabet = text_alphabet
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        if metrics is None:
            template = causal_lm_metrics(ignore_index)
        elif isinstance(metrics, MetricCollection):
            template = metrics
        else:
            template = MetricCollection(metrics)
        # Kept out of the module tree: only its copies hold states that Lightning logs.
        self._metrics_template = (template,)
        self.eval_metrics = nn.ModuleDict()
        self._samples_seen: dict[str, int] = {}
        self._cannot_split = False

    def forward(self, **batch: Any) -> Any:
        """Call the wrapped model."""
        return self.model(**batch)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Return the model's own loss, logged as ``train/loss``."""
        outputs = self.model(**batch)
        loss = (
            outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        )
        if loss is None:
            raise ValueError(
                f"The model returned no loss (got {type(outputs).__name__} without `loss`). "
                "Training needs a batch with `labels`, which the model turns into its loss."
            )
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=_batch_size(batch))
        return loss

    def validation_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Update and log the ``val/`` metrics of this dataloader."""
        self._evaluation_step("val", batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update and log the ``test/`` metrics of this dataloader."""
        self._evaluation_step("test", batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        """Restart the count of samples seen, which locates the sampler's repeated samples."""
        self._samples_seen.clear()

    on_test_epoch_start = on_validation_epoch_start

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters; subclass to change it."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    def _evaluation_step(self, stage: str, batch: Mapping[str, Any], dataloader_idx: int) -> None:
        metrics = self._metrics_for(stage, dataloader_idx)
        split = self._split_forward(batch)
        if split is None:
            result = aligned_forward(self.model, batch)
            labels = self._checked_labels(result.labels, stage, batch, dataloader_idx)
            preds, target = causal_shift(result.logits, labels)
            metrics["loss"].update(result.logits[:, :-1], target)
        else:
            labels = self._checked_labels(split.labels, stage, batch, dataloader_idx)
            preds, target = self._chunked_predictions(split, labels, metrics["loss"])
        metrics["tokens"].update(preds, target)
        self.log(f"{stage}/loss", metrics["loss"], on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(metrics["tokens"], on_step=False, on_epoch=True)
        if self.tokenizer is not None:
            self._update_text_metrics(metrics["text"], preds, target)
            self.log_dict(metrics["text"], on_step=False, on_epoch=True)

    def _checked_labels(
        self, labels: Tensor | None, stage: str, batch: Mapping[str, Any], dataloader_idx: int
    ) -> Tensor:
        if labels is None:
            raise ValueError(
                f"The {stage} batch has no `labels` (keys: {sorted(batch)}); the metrics compare "
                "the model's predictions with the labels, so the batch must hold them."
            )
        return self._mask_repeated_samples(labels, stage, dataloader_idx)

    def _split_forward(self, batch: Mapping[str, Any]) -> AlignedHiddenStates | None:
        if self.logits_chunk_size is None or self._cannot_split:
            return None
        split = aligned_hidden_states(self.model, batch)
        if split is None:
            self._cannot_split = True
            warnings.warn(
                f"`logits_chunk_size` is set but {type(self.model).__name__} cannot be run up to "
                "its hidden states and output head separately (no `get_output_embeddings()` "
                "Linear head and `base_model`, or a logit transform after the head); using the "
                "full forward, which holds the whole (batch, seq_len, vocab) logits.",
                stacklevel=2,
            )
        return split

    def _chunked_predictions(
        self, split: AlignedHiddenStates, labels: Tensor, nll: TokenNLL
    ) -> tuple[Tensor, Tensor]:
        """Causal shift, argmax and NLL with the head applied to a few positions at a time."""
        hidden = split.hidden_states[:, :-1].flatten(0, 1)
        target = labels[:, 1:]
        flat_target = target.flatten()
        preds = torch.empty_like(flat_target)
        for start in range(0, flat_target.numel(), self.logits_chunk_size):
            chunk = slice(start, start + self.logits_chunk_size)
            logits = split.output_head(hidden[chunk])
            preds[chunk] = logits.argmax(dim=-1)
            nll.update(logits.unsqueeze(0), flat_target[chunk].unsqueeze(0))
        return preds.view_as(target), target

    def _metrics_for(self, stage: str, dataloader_idx: int) -> nn.ModuleDict:
        key = f"{stage}_{dataloader_idx}"
        if key not in self.eval_metrics:
            metrics = {
                "loss": TokenNLL(ignore_index=self.ignore_index),
                "tokens": self._metrics_template[0].clone(prefix=f"{stage}/"),
            }
            if self.tokenizer is not None:
                metrics["text"] = MetricCollection(
                    {
                        "text_bit_match": TextBitMatchAccuracy(alphabet=self.text_alphabet),
                        "text_exact_match": TextExactMatch(),
                    },
                    prefix=f"{stage}/",
                )
            self.eval_metrics[key] = nn.ModuleDict(metrics).to(self.device)
            # Lightning caches where each logged Metric lives; new metrics need a fresh cache.
            self._metric_attributes = None
        return self.eval_metrics[key]

    def _update_text_metrics(
        self, metrics: MetricCollection, preds: Tensor, target: Tensor
    ) -> None:
        supervised = target != self.ignore_index
        rows = supervised.any(dim=1).nonzero().flatten().tolist()
        predicted = [preds[row][supervised[row]].tolist() for row in rows]
        expected = [target[row][supervised[row]].tolist() for row in rows]
        metrics.update(
            self.tokenizer.batch_decode(predicted, skip_special_tokens=True),
            self.tokenizer.batch_decode(expected, skip_special_tokens=True),
        )

    def _mask_repeated_samples(self, labels: Tensor, stage: str, dataloader_idx: int) -> Tensor:
        """Mask the rows that a padding ``DistributedSampler`` repeated to even out the ranks.

        ``DistributedSampler(drop_last=False)`` appends repeated indices to reach
        ``num_samples * num_replicas`` and deals them round-robin, so this process's k-th sample
        is a repeat exactly when ``k * num_replicas + rank >= len(dataset)``. A row whose labels
        are all ``ignore_index`` counts in no metric, so masking it removes it exactly.
        """
        key = f"{stage}_{dataloader_idx}"
        first = self._samples_seen.get(key, 0)
        self._samples_seen[key] = first + labels.shape[0]
        sampler = self._distributed_sampler(stage, dataloader_idx)
        if sampler is None:
            return labels
        # Plain integer arithmetic: no host-device sync in the step.
        first_repeat = -(-(len(sampler.dataset) - sampler.rank) // sampler.num_replicas)
        kept = max(0, first_repeat - first)
        if kept >= labels.shape[0]:
            return labels
        labels = labels.clone()
        labels[kept:] = self.ignore_index
        return labels

    def _distributed_sampler(self, stage: str, dataloader_idx: int) -> DistributedSampler | None:
        if self._trainer is None:
            return None
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        if not isinstance(loader, DataLoader):
            return None
        for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
            if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
                return sampler
        return None


def _batch_size(batch: Mapping[str, Any]) -> int | None:
    for key in ("labels", "input_ids"):
        value = batch.get(key)
        if isinstance(value, Tensor):
            return value.shape[0]
    return None
