"""Fit MultimodalLMModule under Lightning DDP on 2 CPU processes with a CSVLogger and a
TensorBoardLogger, for tests/test_trackers.py: `python tests/trackers_ddp_job.py OUT_DIR`.

Two validations of two loaders (7 and 5 samples: the sampler repeats some), the output head
changed in between; each rank writes ``OUT_DIR/rank<r>.json`` with whether it built a table.
Lightning's "ddp" strategy starts the second process by running this script again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning_ddp_job import (
    GROUPS,
    VAL_BATCH_SIZES,
    VAL_SIZES,
    SpellTokenizer,
    collate,
    collate_with_task,
    samples,
)
from torch.utils.data import DataLoader


def main(out_dir: Path) -> None:
    import lightning.pytorch as pl
    from _reference import favour_token
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from mllm_metrics import trackers
    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config
    from mllm_metrics.lightning import MultimodalLMModule

    class FavourNine(pl.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    module.model.get_output_embeddings().bias[9] = 0.6

    torch.manual_seed(0)
    module = MultimodalLMModule(
        favour_token(TinyLlavaForCausalLM(tiny_llava_config())),
        learning_rate=0.0,
        tokenizer=SpellTokenizer(),
        group_key="task",
        groups=GROUPS,
        records_dir=out_dir / "records",
    )
    train = DataLoader(samples(8, seed=9, min_images=1), batch_size=2, collate_fn=collate)
    vals = [
        DataLoader(samples(size, seed=size), batch_size=batch_size, collate_fn=collate_with_task)
        for size, batch_size in zip(VAL_SIZES, VAL_BATCH_SIZES)
    ]
    loggers = [
        CSVLogger(out_dir / "csv", name="run", version=0),
        TensorBoardLogger(out_dir / "tb", name="run", version=0),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_train_batches=2,
        num_sanity_val_steps=0,
        callbacks=[FavourNine()],
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train, vals)
    built = module in trackers._OWNERS  # a table was built on this process
    result = {"global_rank": trainer.global_rank, "built_tables": built}
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
