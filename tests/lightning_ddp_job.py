"""Run MultimodalLMModule under Lightning DDP on CPU (or in one process) and save what it logged.

Used by tests/test_lightning_ddp.py: `python tests/lightning_ddp_job.py OUT_DIR DEVICES`.
Lightning's "ddp" strategy starts the second process by running this script again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

# 7 and 5 samples: neither is a multiple of 2 x batch size, so the sampler repeats samples.
VAL_SIZES, VAL_BATCH_SIZES = (7, 5), (2, 3)
# "chart" has no sample: its values are zero_division and it is left out of the macro means.
GROUPS = ("vqa", "ocr", "chart")


class SpellTokenizer:
    """Decodes ids as their numbers (records and text metrics need a `batch_decode`)."""

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [" ".join(str(token) for token in sequence) for sequence in sequences]


def samples(count: int, seed: int, min_images: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        images = max(min_images, index % 3)  # rows with 0, 1 and 2 images
        prompt = (
            [1]
            + [-200] * images
            + torch.randint(3, 60, (index % 2 + 1,), generator=generator).tolist()
        )
        # Mostly the favoured token 5 (see favour_token), so that some answers are right.
        answer = torch.tensor([5, 5, 9])[torch.randint(3, (1 + index % 4,), generator=generator)]
        answer = answer.tolist()
        rows.append(
            {
                "prompt": prompt,
                "answer": answer,
                "images": torch.rand(images, 1, 8, 8, generator=generator),
                "task": GROUPS[index % 3 % 2],
            }
        )
    return rows


def collate(rows: list[dict]) -> dict:
    from mllm_metrics.demo import make_multimodal_batch

    images = torch.cat([row["images"] for row in rows])
    return make_multimodal_batch(
        [row["prompt"] for row in rows], [row["answer"] for row in rows], images
    )


def collate_with_task(rows: list[dict]) -> dict:
    """The batch and each row's group (the module's `group_key`, which the model never sees)."""
    return collate(rows) | {"task": [row["task"] for row in rows]}


def main(out_dir: Path, devices: int) -> None:
    import lightning.pytorch as pl
    from _reference import favour_token

    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config
    from mllm_metrics.lightning import MultimodalLMModule

    class RecordSyncedCounts(pl.Callback):
        """Saves each metric's counts summed over the processes (a ratio would hide doubling)."""

        def __init__(self) -> None:
            self.records: dict[str, dict] = {}
            self.calls = 0

        def on_validation_epoch_end(self, trainer, module) -> None:
            self.calls += 1
            counts = {}
            for key, group in module.evaluations.items():
                for metric in group.modules():
                    if isinstance(metric, torchmetrics.Metric) and metric._defaults:
                        with metric.sync_context(should_sync=True):
                            for name, value in metric.metric_state.items():
                                counts[f"{key}/{name}"] = value.tolist()
            self.records[f"{'sanity' if trainer.sanity_checking else 'epoch'}_{self.calls}"] = (
                counts
            )

    import torchmetrics

    torch.manual_seed(0)
    model = favour_token(TinyLlavaForCausalLM(tiny_llava_config()))
    # learning_rate=0 keeps the weights, so validation inside fit equals validate() of the start.
    module = MultimodalLMModule(
        model,
        learning_rate=0.0,
        tokenizer=SpellTokenizer(),
        group_key="task",
        groups=GROUPS,
        records_dir=out_dir / "records",
        generate_max_new_tokens=4,
    )
    # Every training row has an image: a rank whose batch had none would leave the vision
    # parameters without gradients, which plain DDP (find_unused_parameters=False) hangs on.
    train = DataLoader(samples(8, seed=9, min_images=1), batch_size=2, collate_fn=collate)
    vals = [
        DataLoader(samples(size, seed=size), batch_size=batch_size, collate_fn=collate_with_task)
        for size, batch_size in zip(VAL_SIZES, VAL_BATCH_SIZES)
    ]
    recorder = RecordSyncedCounts()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=2,
        num_sanity_val_steps=1,
        callbacks=[recorder],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train, vals)
    fit_logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    validated = trainer.validate(module, vals, verbose=False)
    result = {"fit": fit_logged, "validate": validated, "counts": recorder.records}
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
