"""The demo's ``--backend hf``: the same model and data through the stock ``transformers.Trainer``.

Nothing is subclassed or overridden: :class:`mllm_metrics.hf.StreamingMetrics` is passed as
``compute_metrics=`` with its ``preprocess_logits`` as ``preprocess_logits_for_metrics=`` and
``TrainingArguments(batch_eval_metrics=True)``, and
``expose_processed_labels(model, logits_chunk_size=256, metrics=streaming)`` makes the model's
evaluation forward hand the Trainer what the metrics need: the supervised positions' ids and
NLL, each row's group, and its greedy answer. So the Trainer reports what the Lightning module
reports: the same metrics, per group, free-running, and the same per-sample records in
``out/records``. The Trainer's own progress bars and printed log dictionaries give way to the
demo's one bar of optimizer steps (:class:`StepProgressCallback`, a plain ``TrainerCallback``).
"""

from __future__ import annotations

import inspect
import math
import tempfile
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import Subset
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from mllm_metrics.demo.config import METRIC_KEYS
from mllm_metrics.demo.data import (
    GROUP_KEY,
    GROUPS,
    BitImageCollator,
    StepSampler,
    end_of_answer,
)
from mllm_metrics.demo.progress import StepBar

if TYPE_CHECKING:
    from mllm_metrics.demo.config import DemoConfig

__all__ = ["StepProgressCallback", "train_hf"]

# ``Trainer.evaluate()`` key -> the demo's column.
_COLUMNS = {
    "eval_nll": "val/loss",
    "eval_bit_match": "val/bit_match",
    "eval_exact_match": "val/exact_match",
    "eval_text_bit_match": "val/text_bit_match",
    "eval_text_exact_match": "val/text_exact_match",
    "eval_gen_bit_match": "val/gen_bit_match",
    "eval_gen_exact_match": "val/gen_exact_match",
}


class StepProgressCallback(TrainerCallback):
    """The demo's progress bar (the Lightning back-end's) for ``transformers.Trainer``.

    One :class:`~mllm_metrics.demo.progress.StepBar` over the optimizer steps, with the latest
    ``eval_bit_match`` and ``eval_exact_match`` after it (shown as ``val``), in the main
    process only. It replaces the Trainer's own callbacks that draw a bar for every evaluation
    and print every log dictionary.
    """

    def __init__(self) -> None:
        self._bar: StepBar | None = None
        self._values: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the bar at the current step."""
        if state.is_world_process_zero:
            self._bar = StepBar(state.max_steps, state.global_step, self._values)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Count the optimizer step just taken."""
        if self._bar is not None:
            self._bar.update_to(state.global_step)

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Keep (and show) the evaluation's bit-match and exact-match."""
        for key in ("bit_match", "exact_match"):
            if metrics and f"eval_{key}" in metrics:
                self._values[f"val/{key}"] = float(metrics[f"eval_{key}"])
        if self._bar is not None:
            self._bar.show_validation(self._values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def train_hf(
    config: DemoConfig, model: nn.Module, tokenizer: Any, train: Any, val: Any
) -> list[dict[str, float]]:
    """Train and validate with ``transformers.Trainer`` and ``StreamingMetrics``.

    The settings mirror the Lightning backend: AdamW with a cosine decay and no warmup, no
    weight decay, no gradient clipping, the same micro-batches in the same order (gradient
    accumulation), validation before training and every ``config.val_every`` steps. Each
    evaluation writes its per-sample records to ``config.records_dir``.

    Args:
        config: the demo configuration.
        model: the demo's model.
        tokenizer: the demo's tokenizer.
        train: the training set.
        val: the validation set.

    Returns:
        One dict per validation: ``step`` and the demo's columns (``val/loss`` is
        ``eval_nll``, the token-weighted NLL of the processed labels; the free-running
        ``val/gen_*`` are nan when ``config.generate_max_new_tokens`` is 0).
    """
    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    # bit_match and exact_match, nll, text_bit_match and text_exact_match (with the tokenizer),
    # per group, free-running, and one records file per evaluation.
    streaming = StreamingMetrics(
        tokenizer=tokenizer,
        text_alphabet="01",
        records_dir=config.records_dir,
        group_key=GROUP_KEY,
        groups=GROUPS,
        generate_max_new_tokens=config.max_new_tokens,
        eos_token_id=end_of_answer(model, tokenizer),
    )
    step_rows = {"batch_size": config.batch_size, "micro_batches": config.micro_batches}
    supported = inspect.signature(TrainingArguments).parameters
    # Keyword arguments that older transformers releases lack.
    optional = {
        "batch_eval_metrics": True,
        "train_sampling_strategy": "sequential",
        "eval_on_start": True,
    }
    exposure = expose_processed_labels(model, logits_chunk_size=256, metrics=streaming)
    with tempfile.TemporaryDirectory() as output_dir, exposure:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size // config.micro_batches,
            gradient_accumulation_steps=config.micro_batches,
            per_device_eval_batch_size=64,
            learning_rate=config.learning_rate,
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            max_grad_norm=0.0,
            eval_strategy="steps",
            eval_steps=config.val_every,
            logging_steps=config.val_every,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=config.seed,
            remove_unused_columns=False,  # the collator needs the rows' `image` and `answer`
            dataloader_num_workers=0,
            disable_tqdm=True,  # the demo draws its own bar, or none
            **{name: value for name, value in optional.items() if name in supported},
        )
        trainer = Trainer(
            model=model,
            args=args,
            # The Lightning backend's micro-batches, in order (`StepSampler`'s order).
            train_dataset=Subset(train, list(StepSampler(train, **step_rows))),
            eval_dataset=val,
            data_collator=BitImageCollator(tokenizer, group_key=GROUP_KEY),
            compute_metrics=streaming,
            preprocess_logits_for_metrics=streaming.preprocess_logits,
        )
        # No log dictionaries printed and no evaluation bars: one bar of the steps at most.
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)
        if config.progress_bar:
            trainer.add_callback(StepProgressCallback())
        if "eval_on_start" not in supported:
            trainer.evaluate()
        trainer.train()
        if config.max_steps % config.val_every:
            trainer.evaluate()
    history: dict[int, dict[str, float]] = {}
    for entry in trainer.state.log_history:
        if "eval_bit_match" in entry:
            row = {"step": float(entry["step"])}
            row.update({key: math.nan for key in METRIC_KEYS})  # gen_* stay nan without them
            row.update(
                {column: float(entry[key]) for key, column in _COLUMNS.items() if key in entry}
            )
            history[int(entry["step"])] = row
    return [history[step] for step in sorted(history)]
