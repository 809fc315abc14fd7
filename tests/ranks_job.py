"""torchrun worker of test_ranks.py: what each process must agree on, on 2 processes (gloo).

Run as ``torchrun --nproc_per_node 2 ranks_job.py OUT_DIR``. Every rank runs, in this order
(the cases that raise last, each in its own Trainer; every process raises at the same point, so
the process group stays usable for the next case):

1. ``trainer_sorted``: ``Trainer.evaluate()`` with ``StreamingMetrics(group_key, groups)``, the
   groups sorted on both processes (the same order): values and per-group sums.
2. ``trainer_reversed``: the same with the groups reversed on process 1: must raise.
3. ``lightning_sorted``: ``MultimodalLMModule(group_key, groups)`` ``validate`` under DDP, the
   groups sorted on both: logged values and the per-group sums synced over the processes.
4. ``records``: ``validate`` with ``records_dir`` under a batch sampler that sorts each window
   of the process's share by answer length (the user's ``DistributedSampler`` inside,
   ``use_distributed_sampler=False``): the records file (process 0 writes it).
5. ``lightning_reversed``: case 3 with the groups reversed on process 1: must raise.
6. ``bad_records_dir``: ``fit`` with a ``records_dir`` under a regular file: must raise at setup.

The process group is created here with a 120 s timeout, so a process left waiting for the
other fails instead of hanging. Each case is a function of ``devices``: the test runs the same
functions in its own process (``devices=1``) for the single-process reference. Results go to
``OUT_DIR/rank<r>.json`` (rewritten after each case), the records to ``OUT_DIR/records``.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
from _hf_setup import HAS_BATCH_EVAL_METRICS, SpellTokenizer, counting_metrics
from _parity import parity_collate
from _reference import favour_token
from torch.utils.data import DataLoader, DistributedSampler, Sampler, SequentialSampler

from mllm_metrics import MllmMetricsWarning
from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config
from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

# "chart" has no sample: no value, and out of the macro means.
GROUPS = ("vqa", "ocr", "chart")
SORTED_GROUPS = tuple(sorted(GROUPS))  # ("chart", "ocr", "vqa"): another order than GROUPS
# Distinct answers (each line of a records file names its sample by its `reference`), mostly
# the favoured token 5, each pair of samples shorter then longer: sorting each batch of 2 by
# length, longest first, swaps every pair, so one process draws 1, 0, 3, 2, 5, 4, 6.
ANSWERS = ([5], [5, 9, 5], [9, 5], [5, 5, 9, 5], [9], [5, 5], [5, 9, 9])
BATCH_SIZE = 2
# The process group's timeout: a collective that one process never joins fails after this.
COLLECTIVE_TIMEOUT_S = 120


def groups_of_rank(rank: int) -> tuple[str, ...]:
    """``GROUPS`` on process 0, reversed on the others: what ``list(set(names))`` gives when
    each process has its own string hash seed."""
    return GROUPS if rank == 0 else GROUPS[::-1]


def eval_rows() -> list[dict]:
    """7 rows of 1 or 2 images, ``input_ids``, ``labels`` and ``task`` (5 vqa, 2 ocr)."""
    generator = torch.Generator().manual_seed(7)
    rows = []
    for index, answer in enumerate(ANSWERS):
        images = 1 + index % 2
        text = torch.randint(3, 60, (1 + index % 2,), generator=generator).tolist()
        prompt = [1] + [-200] * images + text
        rows.append(
            {
                "input_ids": prompt + answer,
                "labels": [-100] * len(prompt) + answer,
                "images": torch.rand(images, 1, 8, 8, generator=generator),
                "task": GROUPS[index % 3 % 2],
            }
        )
    return rows


def answer_lengths(rows: list[dict]) -> list[int]:
    return [sum(label != -100 for label in row["labels"]) for row in rows]


def collate_plain(rows: list[dict]) -> dict:
    """The batch without the group key (for a module without ``group_key``)."""
    return {k: v for k, v in parity_collate(rows).items() if k != "task"}


def tiny_model() -> TinyLlavaForCausalLM:
    torch.manual_seed(0)
    return favour_token(TinyLlavaForCausalLM(tiny_llava_config())).eval()


class LengthSortedBatchSampler(Sampler):
    """Pulls ``batch_size`` indices at a time from ``sampler`` and yields each window sorted by
    answer length, longest first (less padding); remembers the batches it yielded."""

    def __init__(self, sampler: Sampler, batch_size: int, lengths: list[int]) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.lengths = lengths
        self.drawn: list[list[int]] = []

    def __iter__(self):
        indices = list(self.sampler)
        for start in range(0, len(indices), self.batch_size):
            window = indices[start : start + self.batch_size]
            batch = sorted(window, key=lambda i: -self.lengths[i])
            self.drawn.append(batch)
            yield batch

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


# ---- transformers.Trainer -----------------------------------------------------------------------


class CapturingStreaming(StreamingMetrics):
    """Keeps the per-group sums of the evaluation (they are reset once it is computed)."""

    def compute(self) -> dict:
        self.group_sums = {
            name: [values.tolist() for values in grouped.sums]
            for name, grouped in self.evaluation.grouped.items()
        }
        return super().compute()


def trainer_evaluation(groups: tuple[str, ...], output_dir: str) -> dict:
    """``Trainer.evaluate()`` (batch_eval_metrics, chunked head) on the 7 rows with ``groups``:
    the results and the per-group sums (numerator, denominator per group)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    streaming = CapturingStreaming(
        counting_metrics(), tokenizer=SpellTokenizer(), group_key="task", groups=groups
    )
    with expose_processed_labels(model, logits_chunk_size=3, metrics=streaming):
        arguments = TrainingArguments(
            output_dir=output_dir,
            per_device_eval_batch_size=BATCH_SIZE,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            **({"batch_eval_metrics": True} if HAS_BATCH_EVAL_METRICS else {}),
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            eval_dataset=eval_rows(),
            data_collator=parity_collate,
            compute_metrics=streaming,
            preprocess_logits_for_metrics=streaming.preprocess_logits,
        )
        results = trainer.evaluate()
    return {"results": results, "group_sums": streaming.group_sums}


# ---- Lightning ----------------------------------------------------------------------------------


def _lightning_trainer(devices: int, callbacks: list | None = None, **kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=callbacks or [],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def _synced_states(module) -> dict[str, list]:
    """Every metric state of the ``val`` evaluation, summed over the processes (the per-group
    sums among them, one slot per group), read before the module logs (and resets) them."""
    import torchmetrics

    states = {}
    for name, metric in module.evaluations["val_0"].named_modules():
        if isinstance(metric, torchmetrics.Metric) and metric._defaults:
            with metric.sync_context(should_sync=True):
                for state, value in metric.metric_state.items():
                    states[f"{name}/{state}"] = value.tolist()
    return states


def lightning_groups(groups: tuple[str, ...], devices: int, read_states: bool = True) -> dict:
    """``validate`` of ``MultimodalLMModule(group_key="task", groups=groups)`` on the 7 rows
    (Lightning's DistributedSampler: process 1 gets a repeat of row 0): what it logged, and
    (``read_states``) every state synced over the processes."""
    import lightning.pytorch as pl

    from mllm_metrics.lightning import MultimodalLMModule

    class ReadStates(pl.Callback):  # callbacks run before the module's epoch-end hook
        def __init__(self) -> None:
            self.states: dict = {}

        def on_validation_epoch_end(self, trainer, module) -> None:
            self.states = _synced_states(module)

    reader = ReadStates()
    module = MultimodalLMModule(tiny_model(), group_key="task", groups=groups, logits_chunk_size=3)
    loader = DataLoader(eval_rows(), batch_size=BATCH_SIZE, collate_fn=parity_collate)
    trainer = _lightning_trainer(devices, [reader] if read_states else [])
    [logged] = trainer.validate(module, loader, verbose=False)
    return {"logged": logged, "states": reader.states}


def lightning_records(records_dir: Path, devices: int) -> dict:
    """``validate`` with ``records_dir`` under the length-sorting batch sampler (over the user's
    DistributedSampler on several processes, a SequentialSampler on one): the batches this
    process drew, in their order."""
    from mllm_metrics.lightning import MultimodalLMModule

    rows = eval_rows()
    if devices > 1:
        sampler = DistributedSampler(rows, num_replicas=devices, rank=_rank(), shuffle=False)
    else:
        sampler = SequentialSampler(rows)
    batches = LengthSortedBatchSampler(sampler, BATCH_SIZE, answer_lengths(rows))
    loader = DataLoader(rows, batch_sampler=batches, collate_fn=collate_plain)
    module = MultimodalLMModule(tiny_model(), tokenizer=SpellTokenizer(), records_dir=records_dir)
    trainer = _lightning_trainer(devices, use_distributed_sampler=False)
    [logged] = trainer.validate(module, loader, verbose=False)
    return {"logged": logged, "batches": batches.drawn}


def fit_with_records_dir(records_dir: Path, devices: int) -> dict:
    """``fit`` (2 steps, then a validation) with ``records_dir``: what it raised, the global step
    it reached and how many training forwards ran."""
    from mllm_metrics.lightning import MultimodalLMModule

    model = tiny_model().train()
    training_forwards = []

    def count(module, args) -> None:
        if torch.is_grad_enabled():
            training_forwards.append(1)

    model.register_forward_pre_hook(count)
    module = MultimodalLMModule(model, records_dir=records_dir)
    rows = eval_rows()
    train = DataLoader(rows[:4], batch_size=BATCH_SIZE, collate_fn=collate_plain)
    val = DataLoader(rows, batch_size=BATCH_SIZE, collate_fn=collate_plain)
    trainer = _lightning_trainer(devices, max_steps=2, num_sanity_val_steps=0)
    outcome = run_case(lambda: trainer.fit(module, train, val))
    outcome["global_step"] = trainer.global_step
    outcome["training_forwards"] = len(training_forwards)
    return outcome


def run_case(run: Callable[[], object]) -> dict:
    """``{"raised": None, "value": ...}``, or the exception's type name and message."""
    try:
        value = run()
    except Exception as error:  # recorded per rank; the test says which are expected
        return {"raised": type(error).__name__, "message": str(error)}
    return {"raised": None, "value": value}


def _main(out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("error", MllmMetricsWarning)  # as in the test suite
    out = Path(out_dir)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results: dict = {"world_size": world, "backend": torch.distributed.get_backend()}
    seconds: dict[str, float] = {}
    results["seconds"] = seconds
    path = out / f"rank{rank}.json"
    not_a_directory = out / "not_a_directory"
    if rank == 0:
        not_a_directory.write_text("a regular file\n")
    torch.distributed.barrier()
    trainer_output = str(out / f"trainer_output_rank{rank}")
    cases = {
        "trainer_sorted": lambda: trainer_evaluation(SORTED_GROUPS, trainer_output),
        "trainer_reversed": lambda: trainer_evaluation(groups_of_rank(rank), trainer_output),
        "lightning_sorted": lambda: lightning_groups(SORTED_GROUPS, world),
        "records": lambda: lightning_records(out / "records", world),
        # No callback that syncs first: the module's own epoch end must be where it raises.
        "lightning_reversed": lambda: lightning_groups(groups_of_rank(rank), world, False),
    }
    for name, case in cases.items():
        started = time.perf_counter()
        results[name] = run_case(case)
        seconds[name] = time.perf_counter() - started
        path.write_text(json.dumps(results, indent=1))
    started = time.perf_counter()
    results["bad_records_dir"] = fit_with_records_dir(not_a_directory / "records", world)
    results["bad_records_dir"]["records_dir"] = str(not_a_directory / "records")
    seconds["bad_records_dir"] = time.perf_counter() - started
    results["finished"] = True
    path.write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()  # both processes got here: neither was left waiting
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1])
