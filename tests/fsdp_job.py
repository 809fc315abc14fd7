"""The supervised-only chunked head on models sharded with FSDP2 (``fully_shard``), 2 CPU processes.

Run as ``torchrun --standalone --nproc_per_node 2 fsdp_job.py OUT_DIR``; used by test_fsdp.py.
Each decoder layer, then the root model, is sharded with ``fully_shard`` (gloo, CPU). Every rank
feeds the *same* batches (FSDP shards the parameters, not the data), so each rank's results must
equal those of the unsharded model, computed in the same process before sharding. Models: the
LLaVA-style demo model, a Llama, and a Llama whose output head is an FSDP module of its own.
Per model it records, for the unsharded reference and for the sharded model:

- ``split``: ``aligned_hidden_states`` + ``supervised_head_predictions`` per batch (what the
  Lightning module and the Trainer path run): ids, shifted labels and row NLL;
- ``trainer``: what ``Trainer.prediction_step`` does with ``batch_eval_metrics`` under
  ``expose_processed_labels(model, logits_chunk_size=3)``: the model called in eval mode with
  labels, its outputs through ``StreamingMetrics.preprocess_logits`` and ``StreamingMetrics``;
  the raw metric states, the results and the summed loss.

Then ``lightning``: ``Trainer.validate`` of ``MultimodalLMModule`` under Lightning's
``ModelParallelStrategy`` (FSDP2 applied in ``configure_model``, data split by the
``DistributedSampler`` as in real use): its synced metric states and logged values.
Each rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

CHUNK = 3


def shard(model: torch.nn.Module, mesh=None, head_unit: bool = False) -> torch.nn.Module:
    """FSDP2 as its docs apply it: each decoder layer, then the root (embeddings, head...);
    with ``head_unit``, the output head is an FSDP module of its own as well."""
    for layer in model.base_model.layers:
        fully_shard(layer, mesh=mesh)
    if head_unit:
        fully_shard(model.get_output_embeddings(), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_sharded(model: torch.nn.Module) -> bool:
    """Whether no gathered parameter is left: every parameter is a shard (a DTensor)."""
    return all(isinstance(p, DTensor) for p in model.parameters())


def split_predictions(model, batches) -> list[dict]:
    from mllm_metrics.chunked import supervised_head_predictions
    from mllm_metrics.labels import aligned_hidden_states

    results = []
    with torch.no_grad():
        for batch in batches:
            split = aligned_hidden_states(model, batch)
            chunked = supervised_head_predictions(
                split.hidden_states, split.output_head, split.labels, CHUNK
            )
            results.append(
                {
                    "preds": chunked.preds.tolist(),
                    "target": chunked.target.tolist(),
                    "row_nll": chunked.row_nll.tolist(),
                }
            )
    return results


def trainer_style(model, batches) -> dict:
    """``Trainer.prediction_step`` + ``batch_eval_metrics``, by hand, on this process only."""
    from _hf_setup import counting_metrics
    from transformers import EvalPrediction
    from transformers.trainer_pt_utils import nested_detach

    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    streaming = StreamingMetrics(counting_metrics())
    loss = 0.0
    with expose_processed_labels(model, logits_chunk_size=CHUNK):
        ignore_keys = getattr(model.config, "keys_to_ignore_at_inference", None) or []
        for batch in batches:
            with torch.no_grad():
                outputs = model(**batch)
            loss += float(outputs["loss"])
            # As Trainer.prediction_step: every field but the loss, detached; one field alone.
            logits = nested_detach(
                tuple(v for k, v in outputs.items() if k not in [*ignore_keys, "loss"])
            )
            logits = logits[0] if len(logits) == 1 else logits
            preprocessed = streaming.preprocess_logits(logits, batch["labels"])
            prediction = EvalPrediction(predictions=preprocessed, label_ids=batch["labels"])
            streaming(prediction, compute_result=False)
    states = {
        name: value.item()
        for metric in streaming.metrics.values(copy_state=False)
        for name, value in metric.metric_state.items()
    }
    return {"states": states, "results": streaming.compute(), "loss": loss}


def run_model(model, batches, head_unit: bool = False) -> dict:
    """The unsharded reference, then the same calls on the sharded model."""
    reference = copy.deepcopy(model)
    result = {
        "reference": {
            "split": split_predictions(reference, batches),
            "trainer": trainer_style(reference, batches),
        }
    }
    shard(model, head_unit=head_unit)
    sharded_before = all_sharded(model)
    # The split first, on a model whose root never ran forward (FSDP's lazy init not done).
    split = split_predictions(model, batches)
    result["sharded"] = {
        "all_sharded_before": sharded_before,
        "split": split,
        "all_sharded_after_split": all_sharded(model),
        "trainer": trainer_style(model, batches),
        # Once more, after root forwards (whose default leaves the root's parameters gathered).
        "split_after_forwards": split_predictions(model, batches),
    }
    return result


def lightning_validate(rows, collate) -> dict:
    import lightning.pytorch as pl
    import torchmetrics
    from _hf_setup import tiny_llava
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from mllm_metrics.lightning import MultimodalLMModule

    class ShardedModule(MultimodalLMModule):
        def configure_model(self) -> None:
            if not isinstance(self.model, FSDPModule):
                shard(self.model, self.device_mesh["data_parallel"])

    class RecordSyncedStates(pl.Callback):
        def __init__(self) -> None:
            self.states: dict[str, float] = {}

        def on_validation_epoch_end(self, trainer, module) -> None:
            for key, group in module.evaluations.items():
                for metric in group.modules():
                    if isinstance(metric, torchmetrics.Metric) and metric._defaults:
                        with metric.sync_context(should_sync=True):
                            for name, value in metric.metric_state.items():
                                self.states[f"{key}/{name}"] = value.item()

    recorder = RecordSyncedStates()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[recorder],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = ShardedModule(tiny_llava(), logits_chunk_size=CHUNK)
    loader = DataLoader(rows, batch_size=2, collate_fn=collate)
    [logged] = trainer.validate(module, loader, verbose=False)
    return {"states": recorder.states, "logged": logged, "all_sharded": all_sharded(module.model)}


def llama_batches() -> list[dict]:
    from mllm_metrics.demo import make_multimodal_batch

    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        prompts = [torch.randint(3, 16, (int(n),), generator=generator).tolist() for n in (2, 4, 3)]
        answers = [
            torch.tensor([5, 5, 9])[torch.randint(3, (int(n),), generator=generator)].tolist()
            for n in torch.randint(1, 5, (3,), generator=generator)
        ]
        batches.append(make_multimodal_batch(prompts, answers))
    return batches


def main(out_dir: Path) -> None:
    start = time.perf_counter()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from _hf_setup import collate_llava_style, ddp_eval_set, llava_style_reference
    from _models import tiny_llama
    from _reference import favour_token

    llava, rows = ddp_eval_set()
    llava_batches = [collate_llava_style(rows[i : i + 2]) for i in range(0, len(rows), 2)]
    results = {
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "llava_brute_force": llava_style_reference(llava, rows, batch_size=2),
        # The LLaVA-style demo model (no head bias) and a Llama whose head has a bias.
        "llava": run_model(llava, llava_batches),
        "llama": run_model(favour_token(tiny_llama(), bias=0.5), llama_batches()),
        "llama_head_unit": run_model(
            favour_token(tiny_llama(), bias=0.5), llama_batches(), head_unit=True
        ),
    }
    results["lightning"] = lightning_validate(rows, collate_llava_style)
    results["seconds"] = time.perf_counter() - start
    rank = dist.get_rank()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]))
