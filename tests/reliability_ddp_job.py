"""MultimodalLMModule under Lightning DDP (2 CPU processes, gloo) or in one process, in the
cases where identifying a DistributedSampler's repeated samples is easy to get wrong.

Used by tests/test_reliability_ddp.py: `python tests/reliability_ddp_job.py OUT_DIR DEVICES
[SCENARIO ...]` (default: all of SCENARIOS, in that order). Lightning's "ddp" strategy starts
the second process by running this script again. After each scenario every process rewrites
OUT_DIR/rank{R}.json: per step of a scenario, each dataloader's metric states summed over the
processes (read by a callback before the module logs them), what `validate` returned, the totals
a full count must reach, and the warnings raised.

Scenarios (one tiny model and one module throughout, learning rate 0):
  A: Lightning's own DistributedSampler: eval sets of 1, 3 and 7 samples x batch sizes 1, 2, 4,
     pre-collated items of mixed sizes (`batch_size=None`) and a shuffled loader, all in one
     `validate` call (this is also "several dataloaders of 7, 3 and 1 samples in one call").
  B: the user's own DistributedSampler (`use_distributed_sampler=False`): shuffled, under a batch
     sampler that sorts each window by answer length (the repeated sample lands inside a batch)
     and over pre-collated items.
  D: a `validate`, then a `fit`, that raise at the second validation batch on every process,
     each followed by a new Trainer on the same module; `D/reference` is the uninterrupted run.
  E: an IterableDataset that yields every sample on rank 0 and none on rank 1.
  F: two fit epochs whose validation order changes with the epoch (so do the repeats): Lightning's
     shuffled DistributedSampler, its DistributedSamplerWrapper around a sampler of the user's
     that draws a new order each time, and the user's shuffled DistributedSampler under the
     length-sorting batch sampler.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torchmetrics
from _reference import favour_token
from lightning_ddp_job import collate, samples
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

# E last: it is the one that can leave a process waiting for the other.
SCENARIOS = ("A", "B", "D", "F", "E")
A_SIZES, A_BATCH_SIZES = (1, 3, 7), (1, 2, 4)
# Rows per pre-collated item: with 3 items on 2 processes one item is repeated whole.
PRECOLLATED_ROWS = ((2, 2, 1), (3, 1, 2, 1, 2))
# (samples, batch size) of B's length-sorted loaders.
SORTED_CASES = ((7, 4), (5, 3))
B_LOADERS = ("shuffled", "sorted_7", "sorted_5", "precollated")


def answered(rows: list[dict]) -> dict:
    """The totals a full count of ``rows`` reaches: samples and supervised answer tokens."""
    return {"samples": len(rows), "tokens": sum(len(row["answer"]) for row in rows)}


def precollated(rows: list[dict], sizes: tuple[int, ...]) -> list[dict]:
    """``rows`` collated into consecutive batches of ``sizes`` rows."""
    assert sum(sizes) == len(rows)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [collate(rows[start : start + size]) for start, size in zip(starts, sizes)]


def rotated(rows: list[dict]) -> list[dict]:
    """Sample 0, the one a non-shuffled DistributedSampler repeats, becomes a sample with a
    longer answer, so length-sorting puts the repeat in the middle of its batch."""
    return rows[1:] + rows[:1]


class LengthSortedBatchSampler(Sampler):
    """Pulls ``batch_size`` indices at a time from ``sampler`` and yields each window sorted by
    the sample's answer length, longest first (a common way to reduce padding)."""

    def __init__(self, sampler: Sampler, batch_size: int, lengths: list[int]) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.lengths = lengths

    def __iter__(self):
        window: list[int] = []
        for index in self.sampler:
            window.append(index)
            if len(window) == self.batch_size:
                yield sorted(window, key=lambda i: -self.lengths[i])
                window = []
        if window:
            yield sorted(window, key=lambda i: -self.lengths[i])

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


class UsersSamplers:
    """B's loaders: with several processes each has the user's own DistributedSampler, its rank
    the LOCAL_RANK that Lightning's launcher gives the processes it starts (the first process
    has none before its first launch: rank 0); in one process the same loaders without it."""

    def __init__(self, rows: dict[str, list[dict]], world: int) -> None:
        self.rows = rows
        self.world = world
        self.batches: dict[str, list] = {}  # as this process's sorted loaders yield them
        self.padding: dict[str, list] = {}  # this process's share of the sampler's repeats

    def _sampler(self, dataset: list, shuffle: bool = False) -> Sampler:
        world, rank = self.world, int(os.environ.get("LOCAL_RANK", 0))
        if world > 1:
            return DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=0
            )
        return RandomSampler(dataset) if shuffle else SequentialSampler(dataset)

    def _repeats(self, sampler: Sampler) -> list[int]:
        if not isinstance(sampler, DistributedSampler):
            return []
        real = -(-(len(sampler.dataset) - sampler.rank) // sampler.num_replicas)
        return list(sampler)[real:]

    def loaders(self) -> list[DataLoader]:
        rows = self.rows["shuffled"]
        sampler = self._sampler(rows, shuffle=True)
        loaders = [DataLoader(rows, batch_size=2, sampler=sampler, collate_fn=collate)]
        for count, batch_size in SORTED_CASES:
            name, rows = f"sorted_{count}", self.rows[f"sorted_{count}"]
            lengths = [len(row["answer"]) for row in rows]
            batch_sampler = LengthSortedBatchSampler(self._sampler(rows), batch_size, lengths)
            self.batches[name] = list(batch_sampler)
            self.padding[name] = self._repeats(batch_sampler.sampler)
            loaders.append(DataLoader(rows, batch_sampler=batch_sampler, collate_fn=collate))
        items = precollated(self.rows["precollated"], PRECOLLATED_ROWS[0])
        loaders.append(DataLoader(items, batch_size=None, sampler=self._sampler(items)))
        return loaders


class FreshPermutation(Sampler):
    """A new random order at each iteration, the same one in every process (a seeded generator):
    not a Random/SequentialSampler, so Lightning wraps it in its DistributedSamplerWrapper."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.size


class FirstRankOnly(IterableDataset):
    """All the samples on rank 0 (or without a process group), none on the other ranks."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(self.rows if rank == 0 else [])


class FailAtValidationBatch:
    """A forward pre-hook that, once armed, raises at the ``at``-th forward run without
    gradients (a validation batch): every rank gets as many batches, so all raise together."""

    def __init__(self, at: int = 2) -> None:
        self.at = at
        self.armed = False
        self.calls = 0

    def arm(self) -> None:
        self.armed, self.calls = True, 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        if self.armed and not torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                self.armed = False
                raise RuntimeError(f"interrupted at validation batch {self.at}")


def synced_counts(trainer: object, module: object) -> list[dict]:
    """Each current validation dataloader's metric states summed over the processes."""
    loaders = trainer.val_dataloaders
    count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
    epoch = []
    for dataloader_idx in range(count):
        counts = {}
        for metric in module.evaluations[f"val_{dataloader_idx}"].modules():
            if isinstance(metric, torchmetrics.Metric) and metric._defaults:
                with metric.sync_context(should_sync=True):
                    for name, value in metric.metric_state.items():
                        counts[name] = value.item()
        epoch.append(counts)
    return epoch


class Job:
    """Runs the scenarios with one module and writes what each process saw."""

    def __init__(self, out_dir: Path, devices: int) -> None:
        # Imported here: pytest's --doctest-modules imports this file, also without lightning.
        import lightning.pytorch as pl

        from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config
        from mllm_metrics.lightning import MultimodalLMModule

        class RecordSyncedCounts(pl.Callback):
            """Per validation epoch (not the sanity check), :func:`synced_counts`. Callbacks
            run before the module's epoch-end hook, which logs (and so resets) the metrics."""

            def __init__(self) -> None:
                self.epochs: list[list[dict]] = []

            def on_validation_epoch_end(self, trainer: pl.Trainer, module: object) -> None:
                if not trainer.sanity_checking:
                    self.epochs.append(synced_counts(trainer, module))

        self.pl, self.recorder = pl, RecordSyncedCounts
        self.out_dir = out_dir
        self.devices = devices
        self.results: dict[str, dict] = {}
        torch.manual_seed(0)
        model = favour_token(TinyLlavaForCausalLM(tiny_llava_config()))
        self.failure = FailAtValidationBatch()
        # On the backbone: it runs once per batch both in the full forward and in the
        # chunked-head path (which calls the backbone, not the model).
        model.base_model.register_forward_pre_hook(self.failure)
        # learning_rate=0 keeps the weights: validation inside fit equals validate().
        self.module = MultimodalLMModule(model, learning_rate=0.0)

    def trainer(self, recorder: object, **kwargs) -> object:
        return self.pl.Trainer(
            accelerator="cpu",
            devices=self.devices,
            strategy="ddp" if self.devices > 1 else "auto",
            callbacks=[recorder],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            **kwargs,
        )

    def fit_trainer(self, recorder: object) -> object:
        return self.trainer(recorder, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)

    def train_loader(self) -> DataLoader:
        # Every row has an image: plain DDP needs a gradient for every parameter on every rank.
        rows = samples(2 * self.devices, seed=9, min_images=1)
        return DataLoader(rows, batch_size=2, collate_fn=collate)

    def validate(self, name: str, loaders: object, expected: list[dict], **kwargs) -> None:
        recorder = self.recorder()
        trainer = self.trainer(recorder, **kwargs)
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = trainer.validate(self.module, loaders, verbose=False)
        [counts] = recorder.epochs
        self.results[name] = {
            "counts": counts,
            "validate": values,
            "expected": expected,
            # (message, raised from inside mllm_metrics)
            "warnings": sorted(
                {(str(w.message), "mllm_metrics" in Path(w.filename).parts) for w in caught}
            ),
            "seconds": time.perf_counter() - started,
        }

    def scenario_a(self) -> None:
        sets = [samples(size, seed=size) for size in A_SIZES for _ in A_BATCH_SIZES]
        loaders = [
            DataLoader(rows, batch_size=batch_size, collate_fn=collate)
            for rows, batch_size in zip(sets, A_BATCH_SIZES * len(A_SIZES))
        ]
        for seed, sizes in enumerate(PRECOLLATED_ROWS, start=11):
            sets.append(samples(sum(sizes), seed=seed))
            loaders.append(DataLoader(precollated(sets[-1], sizes), batch_size=None))
        sets.append(samples(7, seed=13))
        loaders.append(DataLoader(sets[-1], batch_size=2, shuffle=True, collate_fn=collate))
        self.validate("A", loaders, [answered(rows) for rows in sets])

    def scenario_b(self) -> None:
        rows = {
            "shuffled": samples(7, seed=21),
            "sorted_7": rotated(samples(7, seed=22)),
            "sorted_5": rotated(samples(5, seed=23)),
            "precollated": samples(5, seed=24),
        }
        data = UsersSamplers(rows, world=self.devices)
        expected = [answered(rows[name]) for name in B_LOADERS]
        self.validate("B", data.loaders(), expected, use_distributed_sampler=False)
        self.results["B"].update(batches=data.batches, padding=data.padding)

    def scenario_d(self) -> None:
        sets = [samples(7, seed=31), samples(5, seed=32)]
        loaders = [DataLoader(rows, batch_size=2, collate_fn=collate) for rows in sets]
        expected = [answered(rows) for rows in sets]
        self.validate("D/reference", loaders, expected)

        self.interrupted("D/validate_interrupted", lambda t: t.validate(self.module, loaders))
        self.validate("D/validate_rerun", loaders, expected)

        train = self.train_loader()
        self.interrupted("D/fit_interrupted", lambda t: t.fit(self.module, train, loaders))
        recorder = self.recorder()
        trainer = self.fit_trainer(recorder)
        trainer.fit(self.module, train, loaders)
        logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.results["D/fit_rerun"] = {
            "counts": recorder.epochs[0],
            "logged": logged,
            "expected": expected,
        }
        self.validate("D/fit_then_validate", loaders, expected)

    def interrupted(self, name: str, run) -> None:
        """``run(trainer)`` with the model armed to raise at the second validation batch."""
        recorder = self.recorder()
        self.failure.arm()
        try:
            run(self.fit_trainer(recorder))
            raised = None
        except RuntimeError as error:
            raised = str(error)
        self.results[name] = {"raised": raised, "epochs_completed": len(recorder.epochs)}

    def scenario_e(self) -> None:
        rows = samples(7, seed=41)
        loader = DataLoader(FirstRankOnly(rows), batch_size=2, collate_fn=collate)
        self.validate("E", [loader], [answered(rows)])

    def scenario_f(self) -> None:
        sets = [samples(7, seed=51), samples(5, seed=52)]
        loaders = [
            DataLoader(sets[0], batch_size=2, shuffle=True, collate_fn=collate),
            DataLoader(sets[1], batch_size=2, sampler=FreshPermutation(5, 0), collate_fn=collate),
        ]
        self.fit_epochs("F/lightning", loaders, [answered(rows) for rows in sets])

        rows = samples(7, seed=53)
        if self.devices > 1:
            rank = int(os.environ.get("LOCAL_RANK", 0))  # see UsersSamplers
            sampler = DistributedSampler(rows, self.devices, rank, shuffle=True, seed=0)
        else:
            sampler = RandomSampler(rows)
        lengths = [len(row["answer"]) for row in rows]
        loader = DataLoader(
            rows, batch_sampler=LengthSortedBatchSampler(sampler, 4, lengths), collate_fn=collate
        )
        self.fit_epochs("F/users", [loader], [answered(rows)], use_distributed_sampler=False)

    def fit_epochs(self, name: str, loaders: list, expected: list[dict], **kwargs) -> None:
        """Two epochs of fit; each validation epoch is saved as ``{name}/epoch_{k}``."""
        recorder = self.recorder()
        trainer = self.trainer(
            recorder, max_epochs=2, limit_train_batches=1, num_sanity_val_steps=0, **kwargs
        )
        trainer.fit(self.module, self.train_loader(), loaders)
        assert len(recorder.epochs) == 2
        for epoch, counts in enumerate(recorder.epochs):
            self.results[f"{name}/epoch_{epoch}"] = {"counts": counts, "expected": expected}

    def run(self, scenarios: list[str]) -> None:
        for scenario in scenarios:
            getattr(self, f"scenario_{scenario.lower()}")()
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            path = self.out_dir / f"rank{rank}.json"
            path.write_text(json.dumps(self.results, indent=1))


if __name__ == "__main__":
    Job(Path(sys.argv[1]), int(sys.argv[2])).run(sys.argv[3:] or list(SCENARIOS))
