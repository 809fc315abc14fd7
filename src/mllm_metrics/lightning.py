"""``MultimodalLMModule``: validate a multimodal LLM against the labels its logits align with."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import RunningStage
except ModuleNotFoundError as missing:  # the one line a user without the extra needs
    raise ModuleNotFoundError(
        f"mllm_metrics.lightning needs Lightning ({missing.msg}): "
        'pip install "mllm-metrics[lightning]"'
    ) from missing
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from mllm_metrics._warning import MllmMetricsWarning
from mllm_metrics.chunked import (
    DEFAULT_LOGITS_CHUNK_SIZE,
    _check_chunk_size,
    supervised_head_predictions,
)
from mllm_metrics.functional import (
    _bit_match_rows,
    _check_token_inputs,
    _decoded_supervised_spans,
    _exact_match_rows,
    _row_nll,
    causal_shift,
)
from mllm_metrics.generation import build_prompts, end_of_sequence_ids, greedy_answers
from mllm_metrics.grouped import MACRO, GroupedMetric, _check_groups, group_ids
from mllm_metrics.labels import (
    AlignedForward,
    AlignedHiddenStates,
    _label_producers,
    aligned_forward,
    aligned_hidden_states,
    select_aligned_labels,
)
from mllm_metrics.metrics import (
    BitMatchAccuracy,
    ExactMatchAccuracy,
    GeneratedBitMatch,
    GeneratedExactMatch,
    TextBitMatchAccuracy,
    TextExactMatch,
    TokenNLL,
    _SumStates,
    _unchanged_on_error,
    causal_lm_metrics,
)
from mllm_metrics.records import SampleRecords, records_file_name, row_statistics
from mllm_metrics.repeats import BatchSamples, distributed_sampler_of, track_repeats, tracker_of

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

    Every validation/test epoch starts from zero (also after an interrupted one, and whichever
    ``Trainer`` runs it). The metric objects of every dataloader exist from the epoch's start.
    They are logged from the steps when every process gets a batch of each loader (a
    ``DistributedSampler``); otherwise (an ``IterableDataset``, another sampler) at the epoch end
    on every process, so a process that got no batch still takes part in each sync, with zeros
    (``trainer.validate`` then returns every dataloader's keys in each result).

    Under DDP, a ``DistributedSampler`` (Lightning's or your own) pads the eval set by repeating
    samples so that every process gets as many; the repeated samples are recognised by their
    dataset index as each batch is drawn (see :mod:`mllm_metrics.repeats`) and their labels
    masked, so the synced values equal a single-process run exactly. Where that cannot be known
    (``drop_last``, an ``IterableDataset``, no ``DistributedSampler``) a warning says so.

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
            apply the output head only to the positions whose shifted label is supervised, this
            many at a time, keeping each chunk's argmax ids and NLL (see
            :mod:`mllm_metrics.chunked`): at most ``logits_chunk_size x vocab_size`` logits
            are alive at once instead of ``batch x seq_len x vocab_size``, and image-feature,
            prompt and padding positions never reach the head. Values equal the full path
            (ids up to near-ties). The predictions that custom ``metrics`` receive hold
            :data:`~mllm_metrics.chunked.NOT_PREDICTED` at unsupervised positions. Default
            256. ``None`` computes the whole logits (from the same split, so the model computes
            no loss of its own and the cross-entropy is taken once). Models that cannot be
            split (see :func:`~mllm_metrics.labels.aligned_hidden_states`) run their own
            forward, with a warning when a chunk size was asked for; for those that need their
            labels inside ``forward`` (LLaVA-style) that forward also computes their loss.
        group_key: the batch key that holds each row's group (a list of names, or an int
            tensor ``(B,)`` of positions in ``groups``); it is removed from the batch before
            the model sees it. Adds ``val/bit_match/<group>``, ``val/exact_match/<group>`` and
            ``val/loss/<group>`` for every group, and ``val/bit_match/macro`` and
            ``val/exact_match/macro``, the means over the groups that have data (see
            :class:`~mllm_metrics.GroupedMetric`). Needs ``groups``.
        groups: the group names, every value ``batch[group_key]`` may hold.
        records_dir: after every validation/test epoch (not the sanity check), write one JSON
            Lines file of per-sample records there, ``{stage}_step{global_step:07d}.jsonl``
            (``..._dl{N}.jsonl`` with several dataloaders); see :mod:`mllm_metrics.records`.
            Lines follow the order one process sees the samples (under DDP, the sampler's order
            over all processes, each sample once); with ``group_key`` they hold ``group``, with
            a ``tokenizer`` ``prediction`` and ``reference``, with generation ``gen_exact``
            (and ``generated``, decoded, with a tokenizer).
        generate_max_new_tokens: also decode greedily, at each validation/test step, from each
            row's prompt (everything before its last run of supervised labels, images
            included, as the data set gives it) for at most this many tokens, stopping at the
            end-of-sequence token, and log the free-running ``val/gen_exact_match`` (the
            generated answer equals that run token for token) and ``val/gen_bit_match``
            (equal tokens position by position over the longer length), and with a
            ``tokenizer`` ``val/gen_text_exact_match`` and ``val/gen_text_bit_match``. The
            teacher-forced values do not change. See :mod:`mllm_metrics.generation`. None
            (default): no generation.
        eos_token_id: the id(s) that end a generated answer; default the model's generation
            config's, else its config's.
        limit_generate_batches: generate on the first this many batches of each evaluation
            loader (an int), or on this share of them (a float, as Lightning's
            ``limit_val_batches``); the ``gen_*`` values cover those batches only.
        generate_every_n_validations: generate in every n-th validation only (the sanity
            check and test runs always generate); the ``gen_*`` keys are logged in those.

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
        logits_chunk_size: int | None = DEFAULT_LOGITS_CHUNK_SIZE,
        group_key: str | None = None,
        groups: Sequence[str] | None = None,
        records_dir: str | Path | None = None,
        generate_max_new_tokens: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        limit_generate_batches: int | float = 1.0,
        generate_every_n_validations: int = 1,
    ) -> None:
        super().__init__()
        if logits_chunk_size is not None:
            _check_chunk_size(logits_chunk_size)
        self.logits_chunk_size = logits_chunk_size
        if (group_key is None) != (groups is None):
            raise ValueError(
                "`group_key` and `groups` go together: the key of each row's group in the batch, "
                f"and the names of all the groups; got group_key={group_key!r}, groups={groups!r}."
            )
        self.group_key = group_key
        self.groups = None if groups is None else _check_groups(groups)
        self.records_dir = None if records_dir is None else Path(records_dir)
        _check_generation_arguments(
            generate_max_new_tokens, limit_generate_batches, generate_every_n_validations
        )
        self.generate_max_new_tokens = generate_max_new_tokens
        self.eos_token_id = eos_token_id
        self.limit_generate_batches = limit_generate_batches
        self.generate_every_n_validations = generate_every_n_validations
        self._generating: dict[str, bool] = {}
        self._validations = 0
        self._warned_short = False
        self._warned_no_end = False
        self._written: set[Path] = set()
        if tokenizer is not None and not callable(getattr(tokenizer, "batch_decode", None)):
            raise TypeError(
                f"Expected a tokenizer with a `batch_decode` method (a Hugging Face tokenizer), "
                f"got {type(tokenizer).__name__}."
            )
        # The plain arguments go into checkpoints and LightningCLI's hparams.yaml; the model,
        # metrics and tokenizer are objects the caller passes again to `load_from_checkpoint`.
        self.save_hyperparameters(ignore=["model", "metrics", "tokenizer"])
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
        self._cannot_split = False
        self._log_at_epoch_end: dict[str, bool] = {}
        self._records: dict[str, SampleRecords] = {}
        self._rows_seen: dict[str, int] = {}

    def forward(self, **batch: Any) -> Any:
        """Call the wrapped model."""
        return self.model(**batch)

    def predict_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor | None]:
        """The model's argmax predictions, causally shifted, with the labels they align with.

        Returns ``{"preds": ids, "target": labels}``: ``ids`` of shape (batch, seq_len' - 1),
        position ``t`` being the prediction for the label at ``t + 1`` of the *processed*
        labels, and ``target`` those labels shifted by one (None when the batch has no
        ``labels``). With ``logits_chunk_size`` the output head is applied to that many
        positions at a time (every position, so the ids can be decoded whole); the logits are
        never kept. ``trainer.predict(module, loader)`` returns one such dict per batch.
        """
        batch = self._model_batch(batch)
        split = self._split_forward(batch)
        if split is None:
            result = self._full_forward(batch)
            labels = result.labels
            ids = result.logits[:, :-1].argmax(dim=-1)
        else:
            labels = split.labels
            hidden = split.hidden_states[:, :-1]
            chunk = self.logits_chunk_size or hidden.shape[0] * hidden.shape[1] or 1
            flat = hidden.reshape(-1, hidden.shape[-1])
            ids = torch.cat(
                [
                    split.output_head(flat[i : i + chunk]).argmax(-1)
                    for i in range(0, len(flat), chunk)
                ]
            ).view(hidden.shape[:2])
        return {"preds": ids, "target": None if labels is None else labels[:, 1:]}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Return the model's own loss, logged as ``train/loss``."""
        outputs = self.model(**self._model_batch(batch))
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
        self._evaluation_step("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update and log the ``test/`` metrics of this dataloader."""
        self._evaluation_step("test", batch, batch_idx, dataloader_idx)

    def setup(self, stage: str) -> None:
        """Have the trainer's evaluation loaders record which samples each batch holds."""
        strategy = self.trainer.strategy
        if not isinstance(vars(strategy).get("process_dataloader"), _TrackRepeats):
            strategy.process_dataloader = _TrackRepeats(strategy.process_dataloader, self.trainer)

    def teardown(self, stage: str) -> None:
        """Undo :meth:`setup` on the trainer's strategy."""
        if self._trainer is not None and isinstance(
            vars(self.trainer.strategy).get("process_dataloader"), _TrackRepeats
        ):
            del self.trainer.strategy.process_dataloader

    def on_validation_epoch_start(self) -> None:
        """Create the ``val/`` metrics of every dataloader, from zero."""
        self._start_epoch("val")

    def on_test_epoch_start(self) -> None:
        """Create the ``test/`` metrics of every dataloader, from zero."""
        self._start_epoch("test")

    def on_validation_epoch_end(self) -> None:
        """Log the ``val/`` metric objects (Lightning syncs, computes and resets them) and
        write the records."""
        self._log_epoch("val")
        self._write_records("val")

    def on_test_epoch_end(self) -> None:
        """Log the ``test/`` metric objects (Lightning syncs, computes and resets them) and
        write the records."""
        self._log_epoch("test")
        self._write_records("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters; subclass to change it."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    def _evaluation_step(
        self, stage: str, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int
    ) -> None:
        metrics = self._metrics_for(stage, dataloader_idx)
        # Taken before the forward: every batch consumes its record, even one that fails.
        samples = self._batch_samples(stage, dataloader_idx, batch)
        group = self._group_ids(batch)
        batch = self._model_batch(batch)
        split = self._split_forward(batch)
        with _unchanged_on_error([m for m in metrics.modules() if isinstance(m, Metric)]):
            if split is None or self.logits_chunk_size is None:
                if split is None:
                    result = self._full_forward(batch)
                    logits, labels = result.logits, result.labels
                else:  # the whole logits, but no loss of the model's own: one cross-entropy
                    logits, labels = split.output_head(split.hidden_states), split.labels
                labels = self._checked_labels(labels, stage, batch, samples.repeated)
                preds, target = causal_shift(logits, labels)
                _check_token_inputs(logits[:, :-1], target, self.ignore_index)
                row_nll = _row_nll(logits[:, :-1], target, self.ignore_index)
            else:
                labels = self._checked_labels(split.labels, stage, batch, samples.repeated)
                chunked = supervised_head_predictions(
                    split.hidden_states,
                    split.output_head,
                    labels,
                    self.logits_chunk_size,
                    self.ignore_index,
                )
                preds, target, row_nll = chunked.preds, chunked.target, chunked.row_nll
            supervised = (target != self.ignore_index).sum()
            metrics["loss"]._update_sums(row_nll.sum(dtype=torch.float64), supervised)
            metrics["tokens"].update(preds, target)
            kept = self._recorded_rows(samples, target.shape[0])
            columns: dict[str, list[Any]] = {}  # record fields of the kept rows
            if group is not None:
                self._update_groups(metrics["groups"], preds, target, row_nll, group)
                columns["group"] = [self.groups[i] for i in group[kept].tolist()]
            if self.tokenizer is not None:
                texts = _decoded_supervised_spans(
                    self.tokenizer, preds, target, self.ignore_index, kept
                )
                self._update_text_metrics(metrics["text"], target, kept, texts)
                columns["prediction"], columns["reference"] = texts
            if self.generate_max_new_tokens is not None:
                generating = self._generates(stage, batch_idx, dataloader_idx)
                columns |= self._free_running(metrics, batch, kept, generating)
            if self.records_dir is not None:
                self._add_records(
                    stage, dataloader_idx, samples, kept, preds, target, row_nll, columns
                )
        if not self._log_at_epoch_end.get(stage, False):
            self._log_metrics(stage, metrics, from_step=True)

    def _generates_this_epoch(self, stage: str) -> bool:
        """Whether this evaluation generates: every ``generate_every_n_validations``-th
        validation (the sanity check always, to try the path early), every test."""
        if self.generate_max_new_tokens is None or self.limit_generate_batches == 0:
            return False
        if stage != "val" or self.trainer.sanity_checking:
            return True
        self._validations += 1
        return (self._validations - 1) % self.generate_every_n_validations == 0

    def _generates(self, stage: str, batch_idx: int, dataloader_idx: int) -> bool:
        if not self._generating.get(stage, False):
            return False
        limit = self.limit_generate_batches
        if isinstance(limit, float):  # a share of the batches, as Lightning's limit_val_batches
            if limit >= 1.0:
                return True
            counts = (
                self.trainer.num_val_batches if stage == "val" else self.trainer.num_test_batches
            )
            total = counts[dataloader_idx] if dataloader_idx < len(counts) else 0
            if not math.isfinite(total):
                raise ValueError(
                    f"`limit_generate_batches={limit}` is a share of the batches, but {stage} "
                    f"dataloader {dataloader_idx} has no length (an IterableDataset): pass a "
                    "number of batches (an int) instead."
                )
            limit = int(limit * total)
        return batch_idx < limit

    def _free_running(
        self,
        metrics: nn.ModuleDict,
        batch: Mapping[str, Any],
        kept: list[int],
        generating: bool,
    ) -> dict[str, list[Any]]:
        """Generate greedy answers, update the ``gen_*`` metrics; the kept rows' record fields
        (null where nothing was generated or the row has no answer)."""
        rows = len(kept)
        columns: dict[str, list[Any]] = {"gen_exact": [None] * rows}
        if self.tokenizer is not None:
            columns["generated"] = [None] * rows
        if not generating:
            return columns
        prompts = build_prompts(batch, self.ignore_index, _pad_token_id(self.model))
        end_ids = end_of_sequence_ids(self.model, self.eos_token_id)
        answers = greedy_answers(
            self.model, batch, prompts, self.generate_max_new_tokens, end_ids, self._lockstep()
        )
        counted = [i for i, row in enumerate(kept) if prompts.references[row] is not None]
        generated = [answers[kept[i]] for i in counted]
        references = [prompts.references[kept[i]] for i in counted]
        self._warn_if_too_short(references)
        self._warn_if_no_end(references, end_ids)
        collection = metrics["generated"]
        collection["gen_bit_match"].update(generated, references)
        collection["gen_exact_match"].update(generated, references)
        for i, answer, reference in zip(counted, generated, references):
            columns["gen_exact"][i] = answer == reference
        if self.tokenizer is not None:
            decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            expected = self.tokenizer.batch_decode(references, skip_special_tokens=True)
            collection["gen_text_bit_match"].update(decoded, expected)
            collection["gen_text_exact_match"].update(decoded, expected)
            for i, text in zip(counted, decoded):
                columns["generated"][i] = text
        return columns

    def _warn_if_too_short(self, references: list[list[int]]) -> None:
        longest = max(map(len, references), default=0)
        if longest > self.generate_max_new_tokens and not self._warned_short:
            self._warned_short = True
            warnings.warn(
                f"A reference answer has {longest} tokens but `generate_max_new_tokens` is "
                f"{self.generate_max_new_tokens}: such answers cannot be generated whole and count "
                "as misses in the gen_* metrics. Raise `generate_max_new_tokens`.",
                category=MllmMetricsWarning,
                stacklevel=2,
            )

    def _warn_if_no_end(self, references: list[list[int]], end_ids: list[int]) -> None:
        if self._warned_no_end or all(ref and ref[-1] in end_ids for ref in references):
            return
        self._warned_no_end = True
        warnings.warn(
            f"A reference answer does not end with an end-of-sequence token {end_ids}: a "
            "generated answer ends only at one (or after `generate_max_new_tokens`), so such "
            "rows can match only if the model stops there by chance. Supervise the end token in "
            "the labels (as Hugging Face's data collators do), or pass `eos_token_id=`.",
            category=MllmMetricsWarning,
            stacklevel=2,
        )

    def _lockstep(self) -> bool:
        """Whether every process must run the same decoding steps: a sharded model's forward
        is a collective (FSDP, DeepSpeed ZeRO-3, tensor parallel)."""
        if self.trainer.world_size == 1:
            return False
        return type(self.trainer.strategy).__name__ in _SHARDING_STRATEGIES

    def _model_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The batch without the group key, which is ours, not the model's."""
        if self.group_key is None or self.group_key not in batch:
            return batch
        return {key: value for key, value in batch.items() if key != self.group_key}

    def _group_ids(self, batch: Mapping[str, Any]) -> Tensor | None:
        if self.group_key is None:
            return None
        if self.group_key not in batch:
            raise ValueError(
                f"The batch has no {self.group_key!r} (`group_key`); its keys: {sorted(batch)}. "
                "Every evaluation batch must say which group each row belongs to."
            )
        rows = _batch_size(batch)
        value = batch[self.group_key]
        return group_ids(value, self.groups, len(value) if rows is None else rows, self.device)

    def _update_groups(
        self,
        grouped: nn.ModuleDict,
        preds: Tensor,
        target: Tensor,
        row_nll: Tensor,
        group: Tensor,
    ) -> None:
        correct, supervised = _bit_match_rows(preds, target, self.ignore_index)
        grouped["bit_match"]._update_rows(correct, supervised, group)
        grouped["exact_match"]._update_rows(
            *_exact_match_rows(preds, target, self.ignore_index), group
        )
        grouped["loss"]._update_rows(row_nll, supervised, group)

    @staticmethod
    def _recorded_rows(samples: BatchSamples, rows: int) -> list[int]:
        """The rows that are samples of the eval set: all but the sampler's repeats."""
        if samples.repeated is None:
            return list(range(rows))
        return [row for row, repeated in enumerate(samples.repeated) if not repeated]

    def _add_records(
        self,
        stage: str,
        dataloader_idx: int,
        samples: BatchSamples,
        kept: list[int],
        preds: Tensor,
        target: Tensor,
        row_nll: Tensor,
        columns: dict[str, list[Any]],
    ) -> None:
        key = f"{stage}_{dataloader_idx}"
        seen = self._rows_seen.get(key, 0)
        self._rows_seen[key] = seen + target.shape[0]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        positions = samples.positions
        if positions is None or any(positions[row] is None for row in kept):
            # Where the sampler's order is unknown: this process's order, interleaved as a
            # DistributedSampler would (one process: the order of the batches).
            positions = [((seen + row) * world + rank, 0) for row in range(target.shape[0])]
        rows = torch.tensor(kept, dtype=torch.long, device=target.device)
        statistics = row_statistics(preds[rows], target[rows], row_nll[rows], self.ignore_index)
        self._records.setdefault(key, SampleRecords()).add(
            [positions[r] for r in kept], statistics | columns
        )

    def _write_records(self, stage: str) -> None:
        """Write this epoch's records of every dataloader (every process takes part)."""
        count = self._loader_count(stage)
        for dataloader_idx in range(count):
            records = self._records.pop(f"{stage}_{dataloader_idx}", SampleRecords())
            if self.records_dir is None or self.trainer.sanity_checking:
                continue
            name = records_file_name(
                stage, self.trainer.global_step, dataloader_idx if count > 1 else None
            )
            path = self.records_dir / name
            if path in self._written and self.trainer.is_global_zero:
                warnings.warn(
                    f"{path} was written by an earlier evaluation at the same global step (e.g. "
                    "`trainer.validate` after `fit`): it is overwritten with this one's records.",
                    category=MllmMetricsWarning,
                    stacklevel=2,
                )
            self._written.add(path)
            records.write(path)

    def _checked_labels(
        self,
        labels: Tensor | None,
        stage: str,
        batch: Mapping[str, Any],
        repeated: list[bool] | None,
    ) -> Tensor:
        if labels is None:
            raise ValueError(
                f"The {stage} batch has no `labels` (keys: {sorted(batch)}); the metrics compare "
                "the model's predictions with the labels, so the batch must hold them."
            )
        if repeated is None:
            return labels
        if len(repeated) != labels.shape[0]:
            raise ValueError(
                f"The batch's labels have {labels.shape[0]} rows but the batch holds "
                f"{len(repeated)} samples: cannot tell which rows are the sampler's repeats."
            )
        # A row whose labels are all `ignore_index` counts in no metric: masking removes it.
        rows = torch.tensor(repeated, device=labels.device)
        return labels.masked_fill(rows.unsqueeze(1), self.ignore_index)

    def _batch_samples(
        self, stage: str, dataloader_idx: int, batch: Mapping[str, Any]
    ) -> BatchSamples:
        tracker = tracker_of(self._loader(stage, dataloader_idx))
        rows = _batch_size(batch)
        if tracker is None or rows is None:
            return BatchSamples(None, None)
        return tracker.next_batch(rows)

    def _split_forward(self, batch: Mapping[str, Any]) -> AlignedHiddenStates | None:
        if self._cannot_split:
            return None
        split = aligned_hidden_states(self.model, batch)
        if split is None:
            self._cannot_split = True
            if self.logits_chunk_size is None:
                return None
            warnings.warn(
                f"`logits_chunk_size` is set but {type(self.model).__name__} cannot be run up to "
                "its hidden states and output head separately (no `get_output_embeddings()` "
                "Linear head and `base_model`, or a logit transform after the head); using the "
                "full forward, which holds the whole (batch, seq_len, vocab) logits.",
                category=MllmMetricsWarning,
                stacklevel=2,
            )
        return split

    def _full_forward(self, batch: Mapping[str, Any]) -> AlignedForward:
        """The model's forward and its aligned labels; its own loss is not computed when the
        labels are not needed to align (``val/loss`` computes the cross-entropy once, itself)."""
        labels = batch.get("labels")
        if labels is None or not _is_transformers_model(self.model) or _label_producers(self.model):
            return aligned_forward(self.model, batch)
        result = aligned_forward(self.model, {k: v for k, v in batch.items() if k != "labels"})
        result.labels = select_aligned_labels(result.outputs, labels)
        return result

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
            if self.groups is not None:
                metrics["groups"], metrics["group_values"] = self._grouped_metrics()
            if self.generate_max_new_tokens is not None:
                generated = {
                    "gen_bit_match": GeneratedBitMatch(),
                    "gen_exact_match": GeneratedExactMatch(),
                }
                if self.tokenizer is not None:
                    generated["gen_text_bit_match"] = TextBitMatchAccuracy(
                        alphabet=self.text_alphabet
                    )
                    generated["gen_text_exact_match"] = TextExactMatch()
                metrics["generated"] = MetricCollection(generated, prefix=f"{stage}/")
            self.eval_metrics[key] = nn.ModuleDict(metrics).to(self.device)
            # Lightning caches where each logged Metric lives; new metrics need a fresh cache.
            self._metric_attributes = None
        return self.eval_metrics[key]

    def _grouped_metrics(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        """The per-group sums, and one loggable value per logged key (group names may hold
        characters a module name cannot, so the values are named by position)."""
        grouped = nn.ModuleDict(
            {
                "bit_match": GroupedMetric(BitMatchAccuracy(self.ignore_index), self.groups),
                "exact_match": GroupedMetric(ExactMatchAccuracy(self.ignore_index), self.groups),
                "loss": GroupedMetric(TokenNLL(self.ignore_index), self.groups),
            }
        )
        values = {}
        for name, metric in grouped.items():
            keys = list(self.groups) + ([MACRO] if name != "loss" else [])
            for position, key in enumerate(keys):
                values[f"{name}_{position}"] = _GroupValue(metric, key, f"{name}/{key}")
        return grouped, nn.ModuleDict(values)

    def _update_text_metrics(
        self,
        metrics: MetricCollection,
        target: Tensor,
        rows: list[int],
        texts: tuple[list[str], list[str]],
    ) -> None:
        """Update with the decoded spans of the rows that have a supervised label."""
        has_label = (target != self.ignore_index).any(dim=1)[rows].tolist()
        predicted, expected = texts
        metrics.update(
            [text for text, keep in zip(predicted, has_label) if keep],
            [text for text, keep in zip(expected, has_label) if keep],
        )

    def _start_epoch(self, stage: str) -> None:
        self._log_at_epoch_end[stage] = not self._every_process_has_every_loader(stage)
        self._generating[stage] = self._generates_this_epoch(stage)
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1 and not isinstance(
            vars(strategy).get("process_dataloader"), _TrackRepeats
        ):
            warnings.warn(
                f"{type(self).__name__}.setup() did not run (a subclass overrides `setup` without "
                "calling `super().setup(stage)`), so the samples the DistributedSampler repeats "
                "cannot be identified and the synced metrics may count them twice.",
                category=MllmMetricsWarning,
                stacklevel=2,
            )
        for dataloader_idx in range(self._loader_count(stage)):
            for metric in self._metrics_for(stage, dataloader_idx).modules():
                if isinstance(metric, Metric):
                    metric.reset()
            self._records.pop(f"{stage}_{dataloader_idx}", None)
            self._rows_seen.pop(f"{stage}_{dataloader_idx}", None)

    def _log_epoch(self, stage: str) -> None:
        if not self._log_at_epoch_end.get(stage, False):
            return
        count = self._loader_count(stage)
        for dataloader_idx in range(count):
            suffix = f"/dataloader_idx_{dataloader_idx}" if count > 1 else ""
            self._log_metrics(stage, self._metrics_for(stage, dataloader_idx), suffix=suffix)

    def _log_metrics(
        self, stage: str, metrics: nn.ModuleDict, suffix: str = "", from_step: bool = False
    ) -> None:
        """Log the metric objects: from a step (Lightning adds the dataloader suffix), or at the
        epoch end with ``suffix``."""
        options = {"on_step": False, "on_epoch": True, "add_dataloader_idx": from_step}
        self.log(f"{stage}/loss{suffix}", metrics["loss"], prog_bar=True, **options)
        for name, metric in metrics["tokens"].items():  # bit-match and exact-match in the bar
            self.log(f"{name}{suffix}", metric, prog_bar=True, **options)
        if "text" in metrics:
            for name, metric in metrics["text"].items():
                self.log(f"{name}{suffix}", metric, **options)
        if "group_values" in metrics:
            for value in metrics["group_values"].values():
                self.log(f"{stage}/{value.name}{suffix}", value, **options)
        if "generated" in metrics and self._generating.get(stage, False):
            for name, metric in metrics["generated"].items():
                self.log(f"{name}{suffix}", metric, **options)

    def _every_process_has_every_loader(self, stage: str) -> bool:
        """Whether every process gets at least one batch of each loader that has data.

        Then Lightning syncs each logged metric in the same order on every process, as it
        computes them from the steps' logs (which also gives one result per dataloader). A
        ``DistributedSampler`` gives every process the same share; an ``IterableDataset`` or
        another sampler may leave a process without a batch of some loader, which would then
        never join that loader's sync: those metrics are logged at the epoch end instead.
        """
        if self.trainer.world_size == 1:
            return True
        return all(distributed_sampler_of(loader) is not None for loader in self._loaders(stage))

    def _loaders(self, stage: str) -> list[Any]:
        if self._trainer is None:
            return []
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        if isinstance(loaders, Mapping):
            return list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            return list(loaders)
        return [] if loaders is None else [loaders]

    def _loader_count(self, stage: str) -> int:
        return max(1, len(self._loaders(stage)))

    def _loader(self, stage: str, dataloader_idx: int) -> Any:
        loaders = self._loaders(stage)
        return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None


class _GroupValue(_SumStates):
    """One value of a :class:`~mllm_metrics.GroupedMetric` as a metric object Lightning can log.

    It has no state of its own: its ``compute()`` is the grouped metric's (synced once, then
    cached by torchmetrics until the next update or reset) at ``key``.
    """

    full_state_update = False

    def __init__(self, grouped: GroupedMetric, key: str, name: str) -> None:
        super().__init__()
        self._grouped = (grouped,)  # not a child: its states are logged through this value only
        self.key = key
        self.name = name

    def update(self) -> None:
        """Nothing to add: the grouped metric is updated."""

    def compute(self) -> Tensor:
        """The grouped metric's value at ``key``."""
        return self._grouped[0].compute()[self.key]


class _TrackRepeats:
    """``Strategy.process_dataloader`` followed by :func:`~mllm_metrics.repeats.track_repeats`
    on the evaluation loaders of a distributed run: the last step before Lightning iterates a
    loader, so its index sampler records every batch from the first."""

    def __init__(self, process_dataloader: Any, trainer: pl.Trainer) -> None:
        self.process_dataloader = process_dataloader
        self.trainer = trainer

    def __call__(self, dataloader: object) -> object:
        dataloader = self.process_dataloader(dataloader)
        stage = self.trainer.state.stage
        if self.trainer.world_size > 1 and stage in _EVALUATION_STAGES:
            dataloader, _ = track_repeats(dataloader, f"a {_EVALUATION_STAGES[stage]} dataloader")
        return dataloader


_EVALUATION_STAGES = {
    RunningStage.SANITY_CHECKING: "validation",
    RunningStage.VALIDATING: "validation",
    RunningStage.TESTING: "test",
}


#: Lightning strategies whose model forward is a collective across processes.
_SHARDING_STRATEGIES = frozenset({"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"})


def _check_generation_arguments(
    max_new_tokens: int | None, limit_batches: int | float, every_n: int
) -> None:
    if max_new_tokens is not None and (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ValueError(
            "Expected `generate_max_new_tokens` to be a positive int or None, got "
            f"{max_new_tokens!r}."
        )
    if isinstance(limit_batches, bool) or not (
        (isinstance(limit_batches, int) and limit_batches >= 0)
        or (isinstance(limit_batches, float) and 0.0 <= limit_batches <= 1.0)
    ):
        raise ValueError(
            "Expected `limit_generate_batches` to be a number of batches (int >= 0) or a share "
            f"of them (float in [0, 1]), as Lightning's `limit_val_batches`; got {limit_batches!r}."
        )
    if not isinstance(every_n, int) or isinstance(every_n, bool) or every_n < 1:
        raise ValueError(
            f"Expected `generate_every_n_validations` to be a positive int, got {every_n!r}."
        )


def _pad_token_id(model: nn.Module) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def _is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face model: it computes a loss only when given labels and never rewrites them
    unless it has a label-producing method (Llava before 4.45)."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _batch_size(batch: Mapping[str, Any]) -> int | None:
    for key in ("labels", "input_ids"):
        value = batch.get(key)
        if isinstance(value, Tensor):
            return value.shape[0]
    return None
