"""Per-sample records cost a few numbers per sample: memory and time of a validation, with and
without ``records_dir``, as the eval set grows.

    python benchmarks/records_memory.py

The demo's tiny LLaVA-style model (``TinyLlavaForCausalLM``, hidden size 64, 2 layers, the
character tokenizer's 35-token vocabulary, untrained) on the demo's 16-bit images
(``BitImageDataset``, ``BitImageCollator``): 4 image positions + 7 prompt tokens + 17 answer
tokens per row, each row tagged with one of 4 groups. ``lightning.Trainer.validate`` on CPU
(logger and progress bar off), batches of 50, N = 1,000 / 2,500 / 5,000 samples, with
``MultimodalLMModule(model, group_key="task", groups=GROUPS)`` and:

- ``off``: no ``records_dir`` (nothing is kept per sample);
- ``on``: ``records_dir=...`` (each record holds the order key, the counts, ``exact``, ``nll``
  and the group);
- ``off+tok`` / ``on+tok``: the same with ``tokenizer=char_tokenizer()``, so the text metrics run
  and each record also holds the decoded prediction and reference strings.

Each N runs in two processes, one per pair (``off``, ``on``) and (``off+tok``, ``on+tok``), the
two modules sharing the model and the ``Trainer``: one warm-up validation of each on 100
samples, then ``REPEATS`` rounds of one timed validation of each, alternating, so that load from
other processes falls on both alike (peak RSS above the RSS before each; wall time), then one
of each under ``tracemalloc`` for the Python heap: a callback's ``on_validation_epoch_start`` /
``on_validation_epoch_end`` (Lightning calls the callbacks' hooks before the module's, so the
end is just before the records are written) reads the traced memory, and a wrapper around
``Evaluation.write_records`` counts the records and their deep size at that moment.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import (
    current_rss_mib,
    header,
    high_water_rss_mib,
    release_free_memory,
    reset_peak_rss,
    run_child,
    table,
)

SIZES = [1000, 2500, 5000]
BATCH = 50
REPEATS = 5  # timed validations of each configuration per process, after a warm-up
THREADS = 1  # torch threads: a tiny model, and steadier times on a shared machine
BITS, CELL, PATCH_CELLS, HIDDEN, LAYERS, HEADS = 16, 2, 2, 64, 2, 4
GROUPS = ("ocr", "counting", "spatial", "captions")
CONFIGS = {
    "off": "records off",
    "on": "records on (groups)",
    "off+tok": "records off, tokenizer",
    "on+tok": "records on, tokenizer (groups + prediction/reference strings)",
}
# The configuration each "records on" one is compared with: the same module, no records_dir.
BASELINE = {"on": "off", "on+tok": "off+tok"}
KiB, MiB = 2**10, 2**20


# ---- the model and the data -----------------------------------------------------------------


class TaggedBits(torch.utils.data.Dataset):
    """The demo's bit images, each row tagged with a group (``index % len(GROUPS)``)."""

    def __init__(self, size: int) -> None:
        from mllm_metrics.demo import BitImageDataset

        self.rows = BitImageDataset(size, bits=BITS, seed=7919, cell_size=CELL)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.rows[index], "task": GROUPS[index % len(GROUPS)]}


class TaggedCollator:
    """``BitImageCollator`` plus ``batch["task"]``, the rows' group names."""

    def __init__(self, tokenizer: Any) -> None:
        from mllm_metrics.demo import BitImageCollator

        self.collate = BitImageCollator(tokenizer)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.collate(rows), "task": [row["task"] for row in rows]}


def build_model(tokenizer: Any) -> torch.nn.Module:
    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config

    torch.manual_seed(0)
    config = tiny_llava_config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        image_size=4 * CELL,  # a 4 x 4 grid of cells holds the 16 bits
        patch_size=CELL * PATCH_CELLS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return TinyLlavaForCausalLM(config).eval()


# ---- measuring ------------------------------------------------------------------------------


def deep_size(samples: list[tuple[Any, ...]]) -> int:
    """Bytes of the records' list, their tuples and every object those hold, each object once
    (group names are shared by all the records of a group, small ints by everyone)."""
    seen: set[int] = set()
    total = sys.getsizeof(samples)
    stack: list[Any] = list(samples)
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, tuple):
            stack.extend(item)
    return total


def child(variant: str, size: int) -> None:
    """Both configurations of ``variant`` ("plain" or "tok"), records off and on, in this one
    process, alternating, so that load from other processes falls on both alike."""
    import lightning.pytorch as pl

    from mllm_metrics.demo import char_tokenizer
    from mllm_metrics.evaluation import Evaluation
    from mllm_metrics.lightning import MultimodalLMModule

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(THREADS)
    tokenizer = char_tokenizer()
    collate = TaggedCollator(tokenizer)
    model = build_model(tokenizer)
    dataset = TaggedBits(size)

    def loader(rows: int) -> torch.utils.data.DataLoader:
        subset = torch.utils.data.Subset(dataset, range(rows))
        return torch.utils.data.DataLoader(subset, batch_size=BATCH, collate_fn=collate)

    write_seen: list[dict[str, Any]] = []
    write = Evaluation.write_records

    def measured_write(self: Evaluation, path: Path | None, gather: bool | None = None) -> Any:
        """Instrumentation only: the records and their deep size just before the write."""
        records = self.records
        seen = {"records": len(records), "deep_bytes": deep_size(records._samples)}
        start = time.perf_counter()
        written = write(self, path, gather)
        seen["write_seconds"] = time.perf_counter() - start
        write_seen.append(seen)
        return written

    Evaluation.write_records = measured_write

    class Meter(pl.Callback):
        """At the epoch end, before the module writes the records: the process's RSS, or under
        tracemalloc the live Python heap (``gc.collect()`` first; a full collection also empties
        the interpreter's free lists, whose blocks tracemalloc would count as allocated)."""

        def on_validation_epoch_start(self, *args: Any) -> None:
            if tracemalloc.is_tracing():
                gc.collect()
                tracemalloc.reset_peak()
                self.start = tracemalloc.get_traced_memory()[0]

        def on_validation_epoch_end(self, *args: Any) -> None:
            if tracemalloc.is_tracing():
                before_gc, peak = tracemalloc.get_traced_memory()
                self.unreachable = gc.collect()
                self.held = tracemalloc.get_traced_memory()[0] - self.start
                self.before_gc, self.peak = before_gc - self.start, peak - self.start
            else:
                self.rss = current_rss_mib()

    meter = Meter()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[meter],
    )
    suffix = "+tok" if variant == "tok" else ""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as out:
        modules = {}
        for records in ("off", "on"):
            modules[records + suffix] = MultimodalLMModule(
                model,
                tokenizer=tokenizer if suffix else None,
                group_key="task",
                groups=GROUPS,
                records_dir=Path(out) / "records" if records == "on" else None,
            )
            results[records + suffix] = {
                "peaks_mib": [],
                "held_mib": [],
                "seconds": [],
                "reset_works": True,
            }
        for module in modules.values():
            trainer.validate(module, loader(2 * BATCH), verbose=False)  # warm-up
        write_seen.clear()
        for _ in range(REPEATS):
            for config, module in modules.items():
                result = results[config]
                release_free_memory()
                before = current_rss_mib()
                result["reset_works"] &= reset_peak_rss()
                start = time.perf_counter()
                [values] = trainer.validate(module, loader(size), verbose=False)
                result["seconds"].append(time.perf_counter() - start)
                result["peaks_mib"].append(high_water_rss_mib() - before)
                result["held_mib"].append(meter.rss - before)
                result["bit_match"] = values["val/bit_match"]
        write_seconds = [seen["write_seconds"] for seen in write_seen]
        for config, module in modules.items():
            release_free_memory()
            tracemalloc.start()
            trainer.validate(module, loader(size), verbose=False)
            tracemalloc.stop()
            results[config].update(
                heap_held=meter.held,
                heap_peak=meter.peak,
                heap_before_gc=meter.before_gc,
                unreachable=meter.unreachable,
            )
        on = results["on" + suffix]
        on.update(write_seen[-1], write_seconds=statistics.median(write_seconds))
        # One file per validation (a validation at the same step gets "-2", "-3"...): the last.
        path = max((Path(out) / "records").iterdir(), key=lambda file: file.stat().st_mtime_ns)
        on["file_bytes"] = path.stat().st_size
        with path.open() as file:
            records = [json.loads(line) for line in file]
        on["lines"] = len(records)
        if suffix:
            on["prediction_chars"] = statistics.mean(len(r["prediction"]) for r in records)
            on["reference_chars"] = statistics.mean(len(r["reference"]) for r in records)
    print(json.dumps(results))


# ---- the report -----------------------------------------------------------------------------


def slope(values: dict[int, float]) -> float:
    """Least-squares growth per sample of ``values`` over the eval-set sizes."""
    return statistics.linear_regression(list(values), list(values.values())).slope


def main() -> None:
    started, load_before = time.perf_counter(), os.getloadavg()
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for size in SIZES:
        for variant in ("plain", "tok"):
            for config, result in run_child(__file__, variant, str(size)).items():
                results[(config, size)] = result
    load_after = os.getloadavg()
    torch.set_num_threads(THREADS)  # as in the children, for the header
    for (config, size), result in results.items():
        result["time"] = min(result["seconds"])
        if config in BASELINE:  # records on ÷ off, round by round (each round ran both)
            base = results[(BASELINE[config], size)]["seconds"]
            ratios = [on / off for on, off in zip(result["seconds"], base)]
            result["ratio"] = statistics.median(ratios)
            result["ratio_range"] = (min(ratios), max(ratios))
    print(
        header(
            f"Per-sample records: memory and time of `trainer.validate`, batches of {BATCH}, "
            f"N = {' / '.join(f'{n:,}' for n in SIZES)} samples"
        )
    )

    heap = {c: {n: results[(c, n)]["heap_held"] for n in SIZES} for c in CONFIGS}
    rows = []
    for config, name in CONFIGS.items():
        rows.append(
            [
                f"`{config}`: {name}",
                *(f"{heap[config][n] / KiB:,.0f}" for n in SIZES),
                f"**{slope(heap[config]):,.1f}**",
                *(f"{results[(config, n)]['heap_peak'] / KiB:,.0f}" for n in SIZES),
                f"{results[(config, SIZES[-1])]['heap_before_gc'] / KiB:,.0f}",
                f"{results[(config, SIZES[-1])]['unreachable']:,}",
            ]
        )
    print("Python heap (`tracemalloc`, live objects after `gc.collect()`):\n")
    print(
        table(
            [
                "configuration",
                *(f"held at epoch end, N={n:,} (KiB)" for n in SIZES),
                "held per sample (B, least-squares slope)",
                *(f"peak in the epoch, N={n:,} (KiB)" for n in SIZES),
                f"at epoch end before `gc.collect()`, N={SIZES[-1]:,} (KiB)",
                f"objects `gc.collect()` found unreachable there, N={SIZES[-1]:,}",
            ],
            rows,
        )
    )

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"

    rows = []
    for config, name in CONFIGS.items():
        rows.append(
            [
                f"`{config}`: {name}",
                *(spread(results[(config, n)]["held_mib"]) for n in SIZES),
                *(spread(results[(config, n)]["peaks_mib"]) for n in SIZES),
            ]
        )
    print(
        "Process RSS (`/proc/self/status`; MiB above the RSS before the validation, median "
        f"(range) of {REPEATS}):\n"
    )
    print(
        table(
            [
                "configuration",
                *(f"held at epoch end, N={n:,}" for n in SIZES),
                *(f"peak, N={n:,}" for n in SIZES),
            ],
            rows,
        )
    )

    rows = []
    for config in BASELINE:
        for size in SIZES:
            result = results[(config, size)]
            base = results[(BASELINE[config], size)]
            records = result["records"]
            rows.append(
                [
                    f"`{config}`",
                    f"{size:,}",
                    f"{records:,}",
                    f"{result['lines']:,}",
                    f"{result['deep_bytes'] / KiB:,.0f}",
                    f"{result['deep_bytes'] / records:.0f}",
                    f"{(result['heap_held'] - base['heap_held']) / records:.0f}",
                    f"{result['file_bytes'] / KiB:,.0f}",
                    f"{result['file_bytes'] / records:.0f}",
                    f"{result['write_seconds'] * 1e3:.0f}",
                ]
            )
    print("What the records hold, just before the write, and on disk:\n")
    print(
        table(
            [
                "configuration",
                "N",
                "records kept",
                "lines in the file",
                "records' deep size (KiB)",
                "deep size per sample (B)",
                "heap held − records off, per sample (B)",
                "file (KiB)",
                "file per sample (B)",
                "`Evaluation.write_records` (ms)",
            ],
            rows,
        )
    )

    rows = []
    for config, name in CONFIGS.items():
        cells = []
        for size in SIZES:
            result = results[(config, size)]
            cell = f"{result['time']:.2f} / {statistics.median(result['seconds']):.2f}"
            if config in BASELINE:
                low, high = result["ratio_range"]
                cell += f"; **{result['ratio']:.2f}×** ({low:.2f}–{high:.2f})"
            cells.append(cell)
        rows.append([f"`{config}`: {name}", *cells])
    print(
        "Wall time of one `trainer.validate` (s, min / median of "
        f"{REPEATS}; for records on: on ÷ off of the same round, median (range)):\n"
    )
    print(table(["configuration", *(f"N={n:,}" for n in SIZES)], rows))

    small, large = SIZES[0], SIZES[-1]
    off_growth = {c: heap[c][large] - heap[c][small] for c in ("off", "off+tok")}
    per_sample = {c: slope(heap[c]) - slope(heap[BASELINE[c]]) for c in BASELINE}
    ratios = [results[(c, n)]["ratio"] for c in BASELINE for n in SIZES]
    marginal = [(heap["off"][n] - heap["off"][m]) / (n - m) for m, n in zip(SIZES, SIZES[1:])]
    steps = " then ".join(
        f"{rate:.1f} B/sample from {m:,} to {n:,}" for rate, m, n in zip(marginal, SIZES, SIZES[1:])
    )
    if all(later < earlier for earlier, later in zip(marginal, marginal[1:])):
        steps += ", falling: not a per-sample cost"
    peaks = {
        c: {n: statistics.median(results[(c, n)]["peaks_mib"]) for n in SIZES} for c in CONFIGS
    }
    all_peaks = [peak for by_size in peaks.values() for peak in by_size.values()]
    values = {
        f"{c}@{n}": round(results[(c, n)]["bit_match"], 6) for c in CONFIGS for n in (small, large)
    }
    print(
        f"**Conclusion:** records hold ~{per_sample['on']:.0f} bytes per sample "
        f"(~{per_sample['on+tok']:.0f} with the prediction and reference strings) of Python heap "
        f"until the epoch ends ({per_sample['on'] * large / MiB:.2f} / "
        f"{per_sample['on+tok'] * large / MiB:.2f} MiB at N={large:,}; the file takes "
        f"{results[('on', large)]['file_bytes'] / large:.0f} / "
        f"{results[('on+tok', large)]['file_bytes'] / large:.0f} B per sample); without records "
        f"the live heap at the epoch end grows by {off_growth['off'] / KiB:+.1f} KiB "
        f"({off_growth['off+tok'] / KiB:+.1f} KiB with the tokenizer) from N={small:,} to "
        f"N={large:,} ({steps}), and the process's peak RSS above its start "
        f"stays within {min(all_peaks):.1f}–{max(all_peaks):.1f} MiB in every configuration and "
        f"N (records off: {peaks['off'][small]:.1f} MiB at N={small:,}, "
        f"{peaks['off'][large]:.1f} MiB at N={large:,}); records cost "
        f"{min(ratios):.2f}–{max(ratios):.2f}× the validation time.\n"
    )
    reset = all(result["reset_works"] for result in results.values())
    print(
        "Notes:\n\n"
        "- Python heap held at the epoch end: `tracemalloc`'s traced memory in a callback's "
        "`on_validation_epoch_end` (Lightning calls it before the module's, which writes the "
        "records) minus the same at `on_validation_epoch_start`, each after `gc.collect()`, in "
        "one more validation of each configuration, under `tracemalloc` (not timed). Peak in "
        "the epoch: `tracemalloc`'s peak above the start, transient per-batch objects "
        "included. The peak and the figure before `gc.collect()` grow with N in every "
        "configuration, yet the collection finds (next column) no or hardly any unreachable "
        "object: what it frees is the interpreter's free lists (freed tuples, floats, dicts "
        "kept for reuse, bounded in number), which tracemalloc counts as allocated. Torch "
        "tensors' storage is not on the Python heap; the "
        "RSS table holds everything.\n"
        "- Records' deep size: `sys.getsizeof` of the kept list, its tuples and every object "
        "they hold, each object once (group names and small ints are shared), measured by a "
        "wrapper around `Evaluation.write_records` just before it writes; 'heap held − records "
        "off' is the heap held of the same N minus the module's without `records_dir`.\n"
        "- RSS: before each timed validation `gc.collect()` and glibc `malloc_trim(0)`, then "
        "VmRSS is read and the kernel's peak mark reset (`/proc/self/clear_refs`); 'held at "
        "epoch end' is VmRSS in the callback's `on_validation_epoch_end` minus that RSS, 'peak' "
        "VmHWM after the validation minus it"
        + ("" if reset else " (the peak mark could NOT be reset: peak since the process start)")
        + ". The allocator's arenas move these by a MiB or more from run to run, as much as "
        "the records themselves weigh, so the heap table is the one that resolves them.\n"
        "- Wall time includes writing the file. Both modules of a pair share the model and the "
        "`Trainer`, and run in turn, so a ratio compares runs made seconds apart.\n"
        "- The model is untrained: its decoded predictions average "
        f"{results[('on+tok', large)]['prediction_chars']:.1f} characters (special tokens "
        "skipped), the references "
        f"{results[('on+tok', large)]['reference_chars']:.1f} (16 bits); a trained model's "
        "are as long as the references.\n"
        f"- bit-match of each run (off and on must agree): {json.dumps(values)}\n"
        f"- Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on "
        f"{os.cpu_count()} cores. Whole benchmark: {time.perf_counter() - started:.0f} s."
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
