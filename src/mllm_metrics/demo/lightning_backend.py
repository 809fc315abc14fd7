"""The demo's ``--backend lightning``: ``MultimodalLMModule`` in a Lightning ``Trainer``.

The module is used as it is; the demo only gives it a cosine learning-rate schedule (the one
``transformers.get_cosine_schedule_with_warmup`` computes, without warmup), so that the last
steps settle instead of jittering, and so that ``--backend hf`` trains the very same way. The
validation batches carry each row's group (:data:`~mllm_metrics.demo.data.GROUPS`), so the
module also logs the per-group values and writes each validation's per-sample records, with
their group, to ``out/records``. Unless ``generate_max_new_tokens`` is 0, each validation also
decodes every row's answer greedily (free-running, next to teacher forcing): the module logs
``val/gen_bit_match`` and ``val/gen_exact_match`` and the records gain ``gen_exact`` and
``generated``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from mllm_metrics.demo.config import METRIC_KEYS
from mllm_metrics.demo.data import GROUP_KEY, GROUPS, BitImageCollator, StepSampler, end_of_answer
from mllm_metrics.demo.progress import SHOWN_KEYS, StepBar
from mllm_metrics.lightning import MultimodalLMModule

if TYPE_CHECKING:
    from mllm_metrics.demo.config import DemoConfig

__all__ = [
    "CosineScheduleModule",
    "History",
    "StepProgressBar",
    "cosine_factor",
    "train_lightning",
]


def cosine_factor(step: int, total_steps: int) -> float:
    """Learning-rate factor at ``step``: from 1 down to 0 along half a cosine.

    The same numbers as ``transformers``' ``lr_scheduler_type="cosine"`` without warmup.

    Examples:
        >>> [round(cosine_factor(step, 4), 3) for step in range(5)]
        [1.0, 0.854, 0.5, 0.146, 0.0]
    """
    progress = step / max(1, total_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class CosineScheduleModule(MultimodalLMModule):
    """:class:`~mllm_metrics.lightning.MultimodalLMModule` with a per-step cosine decay.

    Args:
        model: the model.
        total_steps: steps over which the learning rate decays to 0.
        **kwargs: passed to :class:`~mllm_metrics.lightning.MultimodalLMModule`.
    """

    def __init__(self, model: nn.Module, *, total_steps: int, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.total_steps = total_steps

    def configure_optimizers(self) -> Any:
        """AdamW (as :class:`~mllm_metrics.lightning.MultimodalLMModule`) with the cosine decay."""
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_factor(step, self.total_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _BitImageData(pl.LightningDataModule):
    """The loaders, built once Lightning knows this process's rank."""

    def __init__(self, config: DemoConfig, tokenizer: Any, train: Any, val: Any) -> None:
        super().__init__()
        self.config, self.train, self.val = config, train, val
        self.collate = BitImageCollator(tokenizer)
        # The validation rows' groups, for the module's per-group values and records.
        self.collate_grouped = BitImageCollator(tokenizer, group_key=GROUP_KEY)

    def train_dataloader(self) -> DataLoader:
        config = self.config
        sampler = StepSampler(
            self.train,
            config.batch_size,
            config.micro_batches,
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
        )
        return DataLoader(
            self.train,
            batch_size=config.batch_size // config.micro_batches,
            sampler=sampler,
            collate_fn=self.collate,
        )

    def val_dataloader(self) -> DataLoader:
        # Under DDP Lightning deals it with a DistributedSampler (no shuffling); the module
        # recognises the rows that sampler repeats.
        return DataLoader(self.val, batch_size=64, collate_fn=self.collate_grouped)


class History(pl.Callback):
    """Collects one row per validation from the values Lightning logged (synced over ranks).

    Attributes:
        rows: ``{"step": global step, key: value...}`` for each validation, in order; nan for a
            key the validation did not log.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the validation that just ended (not the sanity check)."""
        if trainer.sanity_checking:
            return
        values = trainer.callback_metrics
        row = {"step": float(trainer.global_step)}
        # nan for a key this validation did not log (the gen_* ones without generation).
        row.update({key: float(values[key]) if key in values else math.nan for key in self.keys})
        self.rows.append(row)


class StepProgressBar(pl.callbacks.ProgressBar):
    """Lightning's progress bar for the demo: optimizer steps up to ``max_steps``, nothing else.

    Lightning's own bars count batches (micro-batches under gradient accumulation) per epoch
    and open a bar for every validation. This one is a single :class:`StepBar` over the
    training's optimizer steps, with the latest ``val/bit_match`` and ``val/exact_match``
    after it (from ``trainer.validate()`` calls too), on rank 0 only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: StepBar | None = None
        self._values: dict[str, float] = {}

    def disable(self) -> None:
        """Show nothing (Lightning calls this on ranks other than 0)."""
        self._enabled = False

    def enable(self) -> None:
        """Show the bar again."""
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the bar at the current step."""
        if self._enabled:
            self._bar = StepBar(trainer.max_steps, trainer.global_step, self._values)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Count the optimizer steps taken so far (a micro-batch may take none)."""
        if self._bar is not None:
            self._bar.update_to(trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep (and show) the validation's values; no bar is drawn while it runs."""
        if trainer.sanity_checking:
            return
        values = trainer.callback_metrics
        self._values.update({key: float(values[key]) for key in SHOWN_KEYS if key in values})
        if self._bar is not None:
            self._bar.show_validation(self._values)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the bar."""
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the bar, so that the traceback starts on a line of its own."""
        self._close()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print above the bar."""
        if self._bar is None:
            print(*args, **kwargs)
        else:
            self._bar.write(kwargs.get("sep", " ").join(map(str, args)))

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def train_lightning(
    config: DemoConfig, model: nn.Module, tokenizer: Any, train: Any, val: Any
) -> list[dict[str, float]]:
    """Train and validate with Lightning and :class:`~mllm_metrics.lightning.MultimodalLMModule`.

    Validation runs once before training, every ``config.val_every`` steps and after the last
    step. Each step's gradient is the mean of ``config.micro_batches`` micro-batches: one
    process accumulates them (Lightning's ``accumulate_grad_batches``); with
    ``config.devices > 1`` the ``ddp`` strategy spreads them over that many CPU processes and
    DDP's gradient all-reduce does the sum. :class:`StepSampler` puts the same rows in the
    micro-batches either way, and :class:`~mllm_metrics.lightning.MultimodalLMModule`'s
    metrics are exact under DDP. Each validation also writes its per-sample records, with
    their groups, to ``config.records_dir`` (the same files with one process or several), and,
    unless ``config.max_new_tokens`` is None, decodes the answers greedily for the
    free-running ``val/gen_*`` values (the answers end at the model's end-of-sequence id, or
    the tokenizer's ``</s>`` when the model's config gives none).

    Args:
        config: the demo configuration.
        model: the demo's model.
        tokenizer: the demo's tokenizer.
        train: the training set.
        val: the validation set.

    Returns:
        One dict per validation: ``step`` and the demo's columns.
    """
    data = _BitImageData(config, tokenizer, train, val)
    module = CosineScheduleModule(
        model,
        total_steps=config.max_steps,
        tokenizer=tokenizer,
        text_alphabet="01",
        learning_rate=config.learning_rate,
        group_key=GROUP_KEY,
        groups=GROUPS,
        records_dir=config.records_dir,
        generate_max_new_tokens=config.max_new_tokens,
        eos_token_id=end_of_answer(model, tokenizer),
    )
    history = History(METRIC_KEYS)
    # Lightning's start-up notes (GPU/TPU available, tips) say nothing about the demo.
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)
    try:
        steps_per_epoch = len(train) // config.batch_size  # in each process, under DDP too
        trainer = _trainer(config, history, epochs=math.ceil(config.max_steps / steps_per_epoch))
        trainer.validate(module, datamodule=data, verbose=False)  # the curves start at step 0
        trainer.fit(module, datamodule=data)
        if config.max_steps % config.val_every:  # the last step gets its own point
            trainer.validate(module, datamodule=data, verbose=False)
    finally:
        lightning_logger.setLevel(level)
    return history.rows


def _trainer(config: DemoConfig, history: History, epochs: int) -> pl.Trainer:
    accumulate = config.micro_batches // config.devices
    bar: list[pl.Callback] = [StepProgressBar()] if config.progress_bar else []
    return pl.Trainer(
        accelerator="cpu",
        devices=config.devices,
        strategy="ddp" if config.devices > 1 else "auto",
        max_steps=config.max_steps,
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        val_check_interval=config.val_every * accumulate,  # counted in micro-batches
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress_bar,
        callbacks=[history, *bar],
    )
