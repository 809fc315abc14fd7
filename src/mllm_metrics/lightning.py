"""``MultimodalLMModule``: validate a multimodal LLM against the labels its logits align with.

A thin Lightning shell over the evaluation core: each validation/test step produces one
:class:`~mllm_metrics.evaluation.BatchResult` (the model side, :class:`~mllm_metrics.forward.
EvaluationForward`, plus what only Lightning knows: which rows are the sampler's repeats and
which data-set samples they are) and hands it to that stage's and dataloader's
:class:`~mllm_metrics.evaluation.Evaluation`; the metric objects are logged so that Lightning
syncs, computes and resets them.
"""

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
from mllm_metrics.chunked import DEFAULT_LOGITS_CHUNK_SIZE
from mllm_metrics.evaluation import BatchResult, Evaluation, _check_tokenizer
from mllm_metrics.forward import EvaluationForward, batch_rows
from mllm_metrics.grouped import _GroupValue
from mllm_metrics.records import check_records_dir, records_file_name
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
            ``val/loss/<group>`` for every group that has data (no data, no number), and
            ``val/bit_match/macro`` and ``val/exact_match/macro``, the means over those groups
            (see :class:`~mllm_metrics.GroupedMetric`), logged once at each epoch end (one sync
            per grouped metric, however many groups). Needs ``groups``.
        groups: the group names, every value ``batch[group_key]`` may hold, in the same order
            on every process (checked at the first sync: ``sorted(set(names))``, never
            ``list(set(names))``, whose order differs between processes).
        records_dir: after every validation/test epoch (not the sanity check), write one JSON
            Lines file of per-sample records there, ``{stage}_step{global_step:07d}.jsonl``
            (``..._dl{N}.jsonl`` with several dataloaders); see :mod:`mllm_metrics.records`.
            Lines follow the data set's order (the data-set indices the loader's sampler drew,
            on one process and under DDP alike, each sample once; a second evaluation at the
            same step gets ``-2``); with ``group_key`` they hold ``group``, with a ``tokenizer``
            ``prediction`` and ``reference``, with generation ``gen_exact`` (and
            ``generated``, decoded, with a tokenizer). Checked at set-up: a directory that
            cannot be written is an error before anything runs. After each write, the trainer's
            loggers get the samples' table (see :mod:`mllm_metrics.trackers`).
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

    Examples:
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
        self.model_side = EvaluationForward(
            ignore_index=ignore_index,
            logits_chunk_size=logits_chunk_size,
            group_key=group_key,
            groups=groups,
            generate_max_new_tokens=generate_max_new_tokens,
            eos_token_id=eos_token_id,
        )
        _check_generation_schedule(limit_generate_batches, generate_every_n_validations)
        _check_tokenizer(tokenizer)
        # The plain arguments go into checkpoints and LightningCLI's hparams.yaml; the model,
        # metrics and tokenizer are objects the caller passes again to `load_from_checkpoint`.
        self.save_hyperparameters(ignore=["model", "metrics", "tokenizer"])
        self.model = model
        self.tokenizer = tokenizer
        self.text_alphabet = text_alphabet
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.records_dir = None if records_dir is None else Path(records_dir)
        self.limit_generate_batches = limit_generate_batches
        self.generate_every_n_validations = generate_every_n_validations
        # Kept out of the module tree: only the evaluations' copies hold states Lightning logs.
        self._metrics_template = (metrics,)
        self.evaluations = nn.ModuleDict()
        self._generating: dict[str, bool] = {}
        self._validations = 0
        self._log_at_epoch_end: dict[str, bool] = {}
        self._group_values: dict[tuple[str, str, str], _GroupValue] = {}

    # The model side's settings, read-only: set at construction, they shape every evaluation.
    @property
    def ignore_index(self) -> int:
        """The label value of unsupervised positions (-100 is ignored as well)."""
        return self.model_side.ignore_index

    @property
    def logits_chunk_size(self) -> int | None:
        """The supervised-only head's chunk size; None for the model's full logits."""
        return self.model_side.logits_chunk_size

    @property
    def group_key(self) -> str | None:
        """The batch key of each row's group."""
        return self.model_side.group_key

    @property
    def groups(self) -> tuple[str, ...] | None:
        """The group names, in order."""
        return self.model_side.groups

    @property
    def generate_max_new_tokens(self) -> int | None:
        """The longest free-running answer; None without generation."""
        return self.model_side.generate_max_new_tokens

    @property
    def eos_token_id(self) -> int | Sequence[int] | None:
        """The ids that end a free-running answer (default: the model's)."""
        return self.model_side.eos_token_id

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
        preds, target = self.model_side.all_predictions(self.model, batch)
        return {"preds": preds, "target": target}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Return the model's own loss, logged as ``train/loss``."""
        outputs = self.model(**self.model_side.model_batch(batch))
        loss = (
            outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        )
        if loss is None:
            raise ValueError(
                f"The model returned no loss (got {type(outputs).__name__} without `loss`). "
                "Training needs a batch with `labels`, which the model turns into its loss."
            )
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch_rows(batch))
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
        """Have the trainer's evaluation loaders record which samples each batch holds, and
        check that ``records_dir`` can be written before anything runs."""
        strategy = self.trainer.strategy
        if not isinstance(vars(strategy).get("process_dataloader"), _TrackSamples):
            strategy.process_dataloader = _TrackSamples(strategy.process_dataloader, self.trainer)
        if self.records_dir is not None:
            problem = check_records_dir(self.records_dir) if self.trainer.is_global_zero else None
            problem = strategy.broadcast(problem, src=0)  # every process fails, or none
            if problem is not None:
                raise ValueError(problem)

    def teardown(self, stage: str) -> None:
        """Undo :meth:`setup` on the trainer's strategy."""
        if self._trainer is not None and isinstance(
            vars(self.trainer.strategy).get("process_dataloader"), _TrackSamples
        ):
            del self.trainer.strategy.process_dataloader

    def on_validation_epoch_start(self) -> None:
        """Create the ``val/`` evaluations of every dataloader, from zero."""
        self._start_epoch("val")

    def on_test_epoch_start(self) -> None:
        """Create the ``test/`` evaluations of every dataloader, from zero."""
        self._start_epoch("test")

    def on_validation_epoch_end(self) -> None:
        """Log what is logged at the epoch end (Lightning syncs, computes and resets it) and
        write the records."""
        self._end_epoch("val")

    def on_test_epoch_end(self) -> None:
        """Log what is logged at the epoch end (Lightning syncs, computes and resets it) and
        write the records."""
        self._end_epoch("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters; subclass to change it."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    # ---- one batch --------------------------------------------------------------------------

    def _evaluation_step(
        self, stage: str, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int
    ) -> None:
        evaluation = self._evaluation(stage, dataloader_idx)
        # Taken before the forward: every batch consumes its record, even one that fails.
        samples = self._batch_samples(stage, dataloader_idx, batch)
        generate = self._generates(stage, batch_idx, dataloader_idx)
        result, _ = self.model_side(self.model, batch, generate=generate)
        evaluation.update(_with_samples(result, samples))
        if not self._log_at_epoch_end.get(stage, False):
            self._log_scalars(stage, evaluation, from_step=True)

    def _batch_samples(
        self, stage: str, dataloader_idx: int, batch: Mapping[str, Any]
    ) -> BatchSamples:
        tracker = tracker_of(self._loader(stage, dataloader_idx))
        rows = batch_rows(batch)
        if tracker is None or rows is None:
            return BatchSamples(None, None)
        return tracker.next_batch(rows)

    # ---- generation schedule ----------------------------------------------------------------

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

    # ---- epochs -----------------------------------------------------------------------------

    def _evaluation(self, stage: str, dataloader_idx: int) -> Evaluation:
        key = f"{stage}_{dataloader_idx}"
        if key not in self.evaluations:
            self.evaluations[key] = Evaluation(
                self._metrics_template[0],
                ignore_index=self.ignore_index,
                nll_key="loss",
                tokenizer=self.tokenizer,
                text_alphabet=self.text_alphabet,
                groups=self.groups,
                generation=self.generate_max_new_tokens is not None,
                records=self.records_dir is not None,
            ).to(self.device)
            # Lightning caches where each logged Metric lives; new metrics need a fresh cache.
            self._metric_attributes = None
        return self.evaluations[key]

    def _start_epoch(self, stage: str) -> None:
        self._log_at_epoch_end[stage] = not self._every_process_has_every_loader(stage)
        self._generating[stage] = self._generates_this_epoch(stage)
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1 and not isinstance(
            vars(strategy).get("process_dataloader"), _TrackSamples
        ):
            warnings.warn(
                f"{type(self).__name__}.setup() did not run (a subclass overrides `setup` without "
                "calling `super().setup(stage)`), so the samples the DistributedSampler repeats "
                "cannot be identified and the synced metrics may count them twice.",
                category=MllmMetricsWarning,
                stacklevel=2,
            )
        for dataloader_idx in range(self._loader_count(stage)):
            self._evaluation(stage, dataloader_idx).reset()

    def _end_epoch(self, stage: str) -> None:
        count = self._loader_count(stage)
        for dataloader_idx in range(count):
            evaluation = self._evaluation(stage, dataloader_idx)
            suffix = f"/dataloader_idx_{dataloader_idx}" if count > 1 else ""
            if self._log_at_epoch_end.get(stage, False):
                self._log_scalars(stage, evaluation, suffix=suffix)
            self._log_groups(stage, dataloader_idx, evaluation, suffix)
            self._write_records(stage, dataloader_idx if count > 1 else None, evaluation)

    def _log_scalars(
        self, stage: str, evaluation: Evaluation, suffix: str = "", from_step: bool = False
    ) -> None:
        """Log the metric objects of the scalar values: from a step (Lightning adds the
        dataloader suffix), or at the epoch end with ``suffix``."""
        options = {"on_step": False, "on_epoch": True, "add_dataloader_idx": from_step}
        shown = {"loss", "bit_match", "exact_match"}  # in the progress bar
        generated = self._generating.get(stage, False)
        scalars = evaluation.scalar_metrics(generated)
        for key in sorted(scalars, key=lambda key: key != "loss"):  # val/loss first, as before
            self.log(f"{stage}/{key}{suffix}", scalars[key], prog_bar=key in shown, **options)

    def _log_groups(
        self, stage: str, dataloader_idx: int, evaluation: Evaluation, suffix: str
    ) -> None:
        """Log each group's values once, at the epoch end, for the groups that have data.

        The grouped metrics are computed here (one sync each, on every process; torchmetrics
        caches the value); each logged value reads that cache, so thousands of groups cost no
        per-step logging and no further sync.
        """
        if evaluation.grouped is None:
            return
        options = {"on_step": False, "on_epoch": True, "add_dataloader_idx": False}
        for name, grouped, key in evaluation.group_values():
            index = (f"{stage}_{dataloader_idx}", name, key)
            value = self._group_values.get(index)
            if value is None or value._grouped[0] is not grouped:
                value = self._group_values[index] = _GroupValue(grouped, key)
            attribute = f"evaluations.{index[0]}.grouped.{name}"
            self.log(f"{stage}/{name}/{key}{suffix}", value, metric_attribute=attribute, **options)

    def _write_records(
        self, stage: str, dataloader_idx: int | None, evaluation: Evaluation
    ) -> None:
        """Write this epoch's records (every process takes part: process 0 gathers)."""
        if self.records_dir is None or self.trainer.sanity_checking:
            evaluation.clear_records()
            return
        name = records_file_name(stage, self.trainer.global_step, dataloader_idx)
        path = evaluation.write_records(self.records_dir / name)
        # ---- experiment trackers: the samples' table, from the records just gathered ----
        if self.trainer.is_global_zero and evaluation.last_records is not None:
            from mllm_metrics.trackers import log_lightning_tables

            log_lightning_tables(self, stage, dataloader_idx, evaluation.last_records, path)
        # ---- end of experiment trackers ----

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


def _with_samples(result: BatchResult, samples: BatchSamples) -> BatchResult:
    """The batch's result with what the loader knows of its rows: which are the sampler's
    repeats, and which data-set samples the others are."""
    if samples.repeated is not None:
        if len(samples.repeated) != result.rows:
            raise ValueError(
                f"The batch's labels have {result.rows} rows but the batch holds "
                f"{len(samples.repeated)} samples: cannot tell which rows are the sampler's "
                "repeats."
            )
        result.samples = ~torch.tensor(samples.repeated, device=result.target.device)
    if samples.keys is not None and len(samples.keys) == result.rows:
        result.keys = samples.keys
    return result


class _TrackSamples:
    """``Strategy.process_dataloader`` followed by :func:`~mllm_metrics.repeats.track_repeats`
    on the evaluation loaders: the last step before Lightning iterates a loader, so its index
    sampler records every batch from the first (their data-set indices, and under DDP the
    padding's repeats)."""

    def __init__(self, process_dataloader: Any, trainer: pl.Trainer) -> None:
        self.process_dataloader = process_dataloader
        self.trainer = trainer

    def __call__(self, dataloader: object) -> object:
        dataloader = self.process_dataloader(dataloader)
        stage = self.trainer.state.stage
        if stage in _EVALUATION_STAGES:
            description = f"a {_EVALUATION_STAGES[stage]} dataloader"
            dataloader, _ = track_repeats(
                dataloader, description, distributed=self.trainer.world_size > 1
            )
        return dataloader


_EVALUATION_STAGES = {
    RunningStage.SANITY_CHECKING: "validation",
    RunningStage.VALIDATING: "validation",
    RunningStage.TESTING: "test",
}


def _check_generation_schedule(limit_batches: int | float, every_n: int) -> None:
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
