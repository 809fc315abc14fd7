"""torchrun worker of test_parity_ddp.py: the parity eval set on 2 processes (gloo), and training.

Run as ``torchrun --nproc_per_node 2 parity_ddp_job.py OUT_DIR``. Every rank:

1. evaluates the parity eval set (``_parity.py``: groups, generation, truncation) with
   ``Trainer.evaluate(metric_key_prefix="dev")``, for the supervised-only chunked head and the
   model's own forward, with ``batch_eval_metrics`` on and off (7 rows, 2 per device: the second
   process's last batch is padded with a duplicate of row 0), records written to a folder of its
   own (``records/<run>/rank<r>``: process 1's must stay empty);
2. trains 3 steps under Trainer's DDP (default ``find_unused_parameters``) twice from the same
   initial weights: once without any exposure, once exposed as the README says
   (``expose_processed_labels`` before ``Trainer``), then evaluates the trained model.

It writes its results to ``OUT_DIR/rank<r>.json``; ``OUT_DIR/trained_rank<r>.pt`` holds each
rank's trained weights (exposed run), and ``OUT_DIR/initial.pt`` the initial ones (process 0).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from _hf_setup import HAS_BATCH_EVAL_METRICS
from _parity import (
    BATCH_SIZE,
    parity_collate,
    parity_model,
    parity_rows,
    parity_streaming,
)
from transformers import Trainer, TrainingArguments

from mllm_metrics import MllmMetricsWarning
from mllm_metrics.hf import expose_processed_labels

CHUNKS = {"chunked": 3, "model-forward": None}
MODES = [True, False] if HAS_BATCH_EVAL_METRICS else [False]
TRAINING = {
    "max_steps": 3,
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 2,
    "logging_steps": 1,
    "save_strategy": "no",
}


def eval_run_name(chunk_name: str, batch_eval_metrics: bool) -> str:
    return f"{chunk_name}:batch_eval_metrics={batch_eval_metrics}"


def _arguments(output_dir: str, batch_eval_metrics: bool, **extra) -> TrainingArguments:
    arguments = {
        "output_dir": output_dir,
        "per_device_eval_batch_size": BATCH_SIZE,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        **extra,  # remove_unused_columns and ddp_find_unused_parameters keep their defaults
    }
    if batch_eval_metrics:
        arguments["batch_eval_metrics"] = True
    return TrainingArguments(**arguments)


def _rows_digest(rows: list[dict]) -> list[dict]:
    """What the test compares with the rows it builds itself."""
    return [
        {
            "input_ids": row["input_ids"],
            "labels": row["labels"],
            "task": row["task"],
            "images": row["images"].flatten().tolist(),
        }
        for row in rows
    ]


def _evaluations(rows: list[dict], out_dir: Path, rank: int, tmp: str) -> dict:
    model = parity_model()
    results = {}
    for chunk_name, chunk in CHUNKS.items():
        for batch_eval_metrics in MODES:
            name = eval_run_name(chunk_name, batch_eval_metrics)
            streaming = parity_streaming(out_dir / "records" / name / f"rank{rank}")
            with expose_processed_labels(model, logits_chunk_size=chunk, metrics=streaming):
                trainer = Trainer(
                    model=model,
                    args=_arguments(tmp, batch_eval_metrics),
                    eval_dataset=rows,
                    data_collator=parity_collate,
                    compute_metrics=streaming,
                    preprocess_logits_for_metrics=streaming.preprocess_logits,
                )
                results[name] = trainer.evaluate(metric_key_prefix="dev")
    return results


class _TrainingForwards:
    """Forward hook: the loss of every training forward (this process's own batch, unrounded)
    and whether the output carried ``processed_labels`` (the field DDP's pytree must rebuild)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.with_processed_labels: list[bool] = []

    def __call__(self, module, args, output) -> None:
        if module.training:
            self.losses.append(float(output["loss"].detach()))
            self.with_processed_labels.append("processed_labels" in output)


def _training_record(trainer: Trainer, forwards: _TrainingForwards) -> dict:
    history = trainer.state.log_history
    wrapped = trainer.model_wrapped
    return {
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "grad_norms": [entry["grad_norm"] for entry in history if "grad_norm" in entry],
        "steps": [entry["step"] for entry in history if "loss" in entry],
        "global_step": trainer.state.global_step,
        "forward_losses": forwards.losses,
        "with_processed_labels": forwards.with_processed_labels,
        "wrapper": type(wrapped).__name__,
        "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
    }


def _train_plain(model, rows: list[dict], tmp: str) -> dict:
    """The same training with no exposure at all: the losses the exposed one must give."""
    forwards = _TrainingForwards()
    hook = model.register_forward_hook(forwards)
    trainer = Trainer(
        model=model,
        args=_arguments(tmp, False, **TRAINING),
        train_dataset=rows,
        data_collator=parity_collate,
    )
    trainer.train()
    hook.remove()
    return _training_record(trainer, forwards)


def _train_exposed_then_evaluate(model, rows: list[dict], out_dir: Path, rank: int, tmp: str):
    """The README's order: expose, build the Trainer, train, evaluate."""
    streaming = parity_streaming(out_dir / "records" / "trained" / f"rank{rank}")
    handle = expose_processed_labels(model, logits_chunk_size=3, metrics=streaming)
    forwards = _TrainingForwards()
    hook = model.register_forward_hook(forwards)  # after the exposure's: sees its field
    trainer = Trainer(
        model=model,
        args=_arguments(tmp, HAS_BATCH_EVAL_METRICS, **TRAINING),
        train_dataset=rows,
        eval_dataset=rows,
        data_collator=parity_collate,
        compute_metrics=streaming,
        preprocess_logits_for_metrics=streaming.preprocess_logits,
    )
    trainer.train()
    training = _training_record(trainer, forwards)
    results = trainer.evaluate()
    hook.remove()
    handle.remove()
    return training, results


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key].double() - b[key].double()).abs().max()) for key in a)


def _main(out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("error", MllmMetricsWarning)  # as in the test suite
    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    rows = parity_rows(parity_model())
    results: dict = {"rows": _rows_digest(rows)}
    with tempfile.TemporaryDirectory() as tmp:
        results["evaluations"] = _evaluations(rows, out, rank, tmp)
        trained = parity_model()
        plain = copy.deepcopy(trained)  # before any exposure: the same initial weights
        initial = {k: v.clone() for k, v in trained.state_dict().items()}
        results["plain"] = _train_plain(plain, rows, tmp)
        results["exposed"], results["trained_evaluation"] = _train_exposed_then_evaluate(
            trained, rows, out, rank, tmp
        )
        results["world_size"] = torch.distributed.get_world_size()
        results["backend"] = torch.distributed.get_backend()
    weights = trained.state_dict()
    results["exposed_vs_plain_weights"] = _max_difference(weights, plain.state_dict())
    results["trained_vs_initial_weights"] = _max_difference(weights, initial)
    torch.save(weights, out / f"trained_rank{rank}.pt")
    if rank == 0:
        torch.save(initial, out / "initial.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()


if __name__ == "__main__":
    _main(sys.argv[1])
