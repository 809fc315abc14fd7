"""Never hold the logits: peak memory and time of one LLaVA-shaped validation step, side by side.

    python benchmarks/supervised_head.py

A LLaVA-1.5-shaped validation batch: B = 4 rows, each one image (3 x 336 x 336 in 14 x 14
patches, so the model's own placeholder expansion gives 24 x 24 = 576 feature positions) + 64
prompt tokens + 32 answer tokens = 672 positions after ``prepare_inputs_labels_for_multimodal``,
Qwen2-VL's vocabulary V = 151936, the demo's ``TinyLlavaForCausalLM`` with hidden size 256 and
2 layers, float32. The (B, L', V) logits are 1.5 GiB; the 4 x 32 supervised positions' are
74 MiB. Configurations, each in its own process:

(a) the full path: ``MultimodalLMModule(model, logits_chunk_size=None)`` in
    ``lightning.Trainer.validate``, and ``transformers.Trainer.evaluate`` with
    ``StreamingMetrics`` and ``expose_processed_labels(model)``;
(b) the chunked head before this change: the output head on ALL positions, 256 at a time
    (:func:`all_positions_chunked_step`, reproduced here on top of ``aligned_hidden_states``);
(c) the supervised-only chunked head, chunk 256: ``MultimodalLMModule(model)`` (the default),
    and ``Trainer.evaluate`` with ``expose_processed_labels(model, logits_chunk_size=256)`` and
    ``StreamingMetrics``;
floor: ``aligned_hidden_states`` then the head on the supervised positions, one expression;
and, for reference, ``aligned_hidden_states`` alone.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
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

BATCH, IMAGE_SIZE, PATCH_SIZE, PROMPT, ANSWER = 4, 336, 14, 64, 32
VOCAB, HIDDEN, LAYERS, CHUNK = 151936, 256, 2, 256
REPEATS = 5  # measured steps per process, after one warm-up step
# The cheap configurations, whose times the targets compare, run in this many processes each,
# interleaved (floor, c, c, backbone, floor, ...), so that load from other processes on a
# shared machine falls on all of them alike; their steps are pooled.
ROUNDS = 3

CONFIGS = {
    "a_lightning": "(a) full logits · Lightning: `MultimodalLMModule(logits_chunk_size=None)`",
    "a_trainer": "(a) full logits · `Trainer.evaluate`: `expose_processed_labels(model)`",
    "b_all": "(b) previous chunked head: ALL positions, 256 at a time (bare step)",
    "c_lightning": "(c) supervised-only head, 256 · Lightning: `MultimodalLMModule(model)`",
    "c_trainer": "(c) supervised-only head, 256 · `Trainer.evaluate`: `logits_chunk_size=256`",
    "floor": "floor: `aligned_hidden_states` + head on supervised positions (bare)",
    "backbone": "for reference: `aligned_hidden_states` alone, no head (bare)",
}
INTERLEAVED = ["floor", "c_lightning", "c_trainer", "backbone"]


# ---- the model and the data -----------------------------------------------------------------


def build_model() -> torch.nn.Module:
    from mllm_metrics.demo import TinyLlavaForCausalLM, tiny_llava_config

    torch.manual_seed(0)
    config = tiny_llava_config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        tokenizer_model_max_length=2048,  # LLaVA-1.5's; nothing is truncated at 672
    )
    model = TinyLlavaForCausalLM(config).eval()
    assert model.num_image_positions == 576, model.num_image_positions
    return model


def rows() -> list[dict[str, torch.Tensor]]:
    """The eval set: 4 rows of BOS, one image placeholder, 63 more prompt tokens, 32 answers."""
    from mllm_metrics.demo import IMAGE_TOKEN_INDEX, make_multimodal_batch

    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(BATCH):
        text = torch.randint(3, VOCAB, (PROMPT - 1,), generator=generator).tolist()
        answer = torch.randint(3, VOCAB, (ANSWER,), generator=generator).tolist()
        image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        batch = make_multimodal_batch([[1, IMAGE_TOKEN_INDEX, *text]], [answer], image)
        samples.append({key: value[0] for key, value in batch.items()})
    return samples


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the rows; ``images`` becomes (num_images, C, H, W), one per placeholder in order."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


# ---- the bare steps -------------------------------------------------------------------------


def all_positions_chunked_step(model, batch, metrics, nll, chunk_size: int = CHUNK) -> None:
    """(b) The chunked head as it was before "Never hold the logits" (commit b580e0d,
    ``MultimodalLMModule._chunked_predictions``): hidden states from the split forward, then the
    output head on EVERY position (image features, prompt and padding included), ``chunk_size``
    flattened positions at a time, keeping each chunk's argmax ids and NLL; then the token
    metrics. Reproduced here because the library no longer has it."""
    from mllm_metrics.labels import aligned_hidden_states

    split = aligned_hidden_states(model, batch)
    hidden = split.hidden_states[:, :-1].flatten(0, 1)
    target = split.labels[:, 1:]
    flat_target = target.flatten()
    preds = torch.empty_like(flat_target)
    for start in range(0, flat_target.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        logits = split.output_head(hidden[chunk])
        preds[chunk] = logits.argmax(dim=-1)
        nll.update(logits.unsqueeze(0), flat_target[chunk].unsqueeze(0))
    metrics.update(preds.view_as(target), target)


def backbone_step(model, batch) -> torch.Tensor:
    """For reference: the split forward alone, up to the final hidden states."""
    from mllm_metrics.labels import aligned_hidden_states

    return aligned_hidden_states(model, batch).hidden_states


def floor_step(model, batch) -> torch.Tensor:
    """The floor: the backbone up to the hidden states, then the head on the positions whose
    shifted label is supervised, in one expression (no argmax, no NLL, no metric)."""
    from mllm_metrics.labels import aligned_hidden_states

    split = aligned_hidden_states(model, batch)
    return split.output_head(split.hidden_states[:, :-1][split.labels[:, 1:] != -100])


# ---- measuring ------------------------------------------------------------------------------


class StepMeter:
    """Brackets steps: before each, garbage is collected, free heap pages go back to the kernel,
    the RSS is read and the kernel's peak-RSS mark is reset; after it, the peak mark minus that
    RSS is the step's peak memory above everything alive before it (the weights, the batch, the
    runtime)."""

    def __init__(self) -> None:
        self.peaks: list[float] = []
        self.before: list[float] = []
        self.seconds: list[float] = []
        self.reset_works = True

    def start(self) -> None:
        release_free_memory()
        self._before = current_rss_mib()
        self.reset_works &= reset_peak_rss()
        self._start = time.perf_counter()

    def stop(self) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.peaks.append(high_water_rss_mib() - self._before)
        self.before.append(self._before)

    def result(self, **extra: Any) -> dict[str, Any]:
        """The measured steps, less the first (the warm-up)."""
        return {
            "peaks_mib": self.peaks[1:],
            "before_mib": self.before[1:],
            "seconds": self.seconds[1:],
            "reset_works": self.reset_works,
            **extra,
        }


def run_lightning(model, chunk: int | None, meter: StepMeter) -> dict[str, Any]:
    import lightning.pytorch as pl

    from mllm_metrics.lightning import MultimodalLMModule

    class Meter(pl.Callback):
        def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
            meter.start()

        def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
            meter.stop()

    batch = collate(rows())
    loader = torch.utils.data.DataLoader([batch] * (1 + REPEATS), batch_size=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[Meter()],
    )
    module = MultimodalLMModule(model, logits_chunk_size=chunk)
    [results] = trainer.validate(module, loader, verbose=False)
    return meter.result(nll=results["val/loss"])


def run_trainer(model, chunk: int | None, meter: StepMeter) -> dict[str, Any]:
    import transformers

    from mllm_metrics.hf import StreamingMetrics, expose_processed_labels

    streaming = StreamingMetrics()
    expose_processed_labels(model, logits_chunk_size=chunk)
    with tempfile.TemporaryDirectory() as out:
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=out,
                per_device_eval_batch_size=BATCH,
                batch_eval_metrics=True,
                remove_unused_columns=False,
                report_to=[],
                use_cpu=True,
                disable_tqdm=True,
                dataloader_num_workers=0,
            ),
            eval_dataset=rows(),
            data_collator=collate,
            compute_metrics=streaming,
            preprocess_logits_for_metrics=streaming.preprocess_logits,
        )
        # Instrumentation only: how much of evaluate() is the prediction step itself.
        step_seconds: list[float] = []
        prediction_step = trainer.prediction_step

        def timed_prediction_step(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            outputs = prediction_step(*args, **kwargs)
            step_seconds.append(time.perf_counter() - start)
            return outputs

        trainer.prediction_step = timed_prediction_step
        for _ in range(1 + REPEATS):
            meter.start()
            results = trainer.evaluate()
            meter.stop()
    return meter.result(nll=results["eval_nll"], prediction_step_seconds=step_seconds[1:])


def run_bare(model, config: str, meter: StepMeter) -> dict[str, Any]:
    from mllm_metrics import TokenNLL, causal_lm_metrics

    batch = collate(rows())
    metrics, nll = causal_lm_metrics(), TokenNLL()
    with torch.inference_mode():
        for _ in range(1 + REPEATS):
            meter.start()
            if config == "floor":
                floor_step(model, batch)  # the result is freed at once
            elif config == "backbone":
                backbone_step(model, batch)
            else:
                all_positions_chunked_step(model, batch, metrics, nll)
            meter.stop()
    return meter.result(nll=float(nll.compute()) if config == "b_all" else None)


def child(config: str) -> None:
    import lightning.pytorch  # noqa: F401  (imported before measuring)
    import transformers  # noqa: F401

    model = build_model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    meter = StepMeter()
    if config.endswith("_lightning"):
        result = run_lightning(model, None if config.startswith("a") else CHUNK, meter)
    elif config.endswith("_trainer"):
        result = run_trainer(model, None if config.startswith("a") else CHUNK, meter)
    else:
        result = run_bare(model, config, meter)
    print(json.dumps({"weights_mib": weights, **result}))


# ---- the report -----------------------------------------------------------------------------


def measure_all() -> dict[str, dict[str, Any]]:
    """Run every configuration in its own process (the interleaved ones ROUNDS times) and pool
    the measured steps: the median peak and the median time, and their ranges."""
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    for config in CONFIGS:
        if config not in INTERLEAVED:
            runs[config].append(run_child(__file__, config))
    for _ in range(ROUNDS):
        for config in INTERLEAVED:
            runs[config].append(run_child(__file__, config))
    peaks = {
        config: [p for child in children for p in child["peaks_mib"]]
        for config, children in runs.items()
    }
    pooled = {}
    for config, children in runs.items():
        seconds = [s for child in children for s in child["seconds"]]
        steps = [s for child in children for s in child.get("prediction_step_seconds", [])]
        pooled[config] = {
            "weights_mib": children[0]["weights_mib"],
            "peak_mib": statistics.median(peaks[config]),
            "peak_range_mib": (min(peaks[config]), max(peaks[config])),
            "before_mib": statistics.median(b for child in children for b in child["before_mib"]),
            "seconds": statistics.median(seconds),
            "seconds_range": (min(seconds), max(seconds)),
            "steps": len(seconds),
            "processes": len(children),
            "prediction_step_seconds": statistics.median(steps) if steps else None,
            "nll": children[0]["nll"],
            "reset_works": all(child["reset_works"] for child in children),
        }
    return pooled


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def main() -> None:
    started, load_before = time.perf_counter(), os.getloadavg()
    results = measure_all()
    load_after = os.getloadavg()
    floor = results["floor"]
    full = {"lightning": results["a_lightning"], "trainer": results["a_trainer"]}
    table_rows = []
    for config, name in CONFIGS.items():
        result = results[config]
        reference = full["trainer" if config.endswith("_trainer") else "lightning"]
        low, high = result["peak_range_mib"]
        seconds = f"{result['seconds'] * 1e3:.0f}"
        if result["prediction_step_seconds"] is not None:
            seconds += f" (`prediction_step` {result['prediction_step_seconds'] * 1e3:.0f})"
        table_rows.append(
            [
                name,
                f"{result['peak_mib']:.0f} ({low:.0f}–{high:.0f})",
                f"{reference['peak_mib'] / max(result['peak_mib'], 1):.1f}×",
                seconds,
                f"{result['seconds_range'][0] * 1e3:.0f}–{result['seconds_range'][1] * 1e3:.0f}",
                f"{result['seconds'] / floor['seconds']:.2f}×",
                f"{result['steps']} in {result['processes']}",
                f"{result['before_mib']:.0f}",
                "—" if result["nll"] is None else f"{result['nll']:.5f}",
            ]
        )
    print(
        header(
            f"Supervised-only chunked head: one LLaVA-shaped validation step, B={BATCH}, "
            f"L'={576 + PROMPT + ANSWER} (576 image + {PROMPT} prompt + {ANSWER} answer), "
            f"V={VOCAB}, hidden {HIDDEN}, {LAYERS} layers, float32"
        )
    )
    print(
        table(
            [
                "configuration",
                "peak step memory above weights (MiB, median (range))",
                "(a) of the same path ÷ this",
                "step time (ms, median)",
                "step time range (ms)",
                "time ÷ floor",
                "steps measured, in processes",
                "RSS before the step (MiB)",
                "NLL per answer token",
            ],
            table_rows,
        )
    )
    c_light, c_train = results["c_lightning"], results["c_trainer"]
    a_light, a_train = full["lightning"], full["trainer"]
    light_ratio = a_light["peak_mib"] / c_light["peak_mib"]
    train_ratio = a_train["peak_mib"] / c_train["peak_mib"]
    light_time = c_light["seconds"] / floor["seconds"]
    train_time = c_train["seconds"] / floor["seconds"]
    train_step_time = c_train["prediction_step_seconds"] / floor["seconds"]
    peak_ratio = c_train["peak_mib"] / c_light["peak_mib"]
    floor_ratio = a_light["peak_mib"] / floor["peak_mib"]
    print("Targets (verdicts from the table's figures):\n")
    print(
        f"- (c) peak step memory ≥ 20× lower than (a), both paths: Lightning {light_ratio:.1f}× "
        f"{verdict(light_ratio >= 20)}; Trainer {train_ratio:.1f}× {verdict(train_ratio >= 20)}. "
        f"(The floor itself is {floor_ratio:.1f}× lower than Lightning's (a).)"
    )
    print(
        f"- (c) step time ≤ 1.15× the floor: Lightning step {light_time:.2f}× "
        f"{verdict(light_time <= 1.15)}; Trainer `evaluate()` {train_time:.2f}× "
        f"{verdict(train_time <= 1.15)} (its `prediction_step` alone {train_step_time:.2f}× "
        f"{verdict(train_step_time <= 1.15)})."
    )
    print(
        f"- Trainer (c) peak ≤ 1.1× Lightning (c) peak: {peak_ratio:.2f}× "
        f"{verdict(peak_ratio <= 1.1)} (full path, for reference: "
        f"{a_train['peak_mib'] / a_light['peak_mib']:.2f}×)."
    )
    reset = all(result["reset_works"] for result in results.values())
    logits_mib = BATCH * (576 + PROMPT + ANSWER) * VOCAB * 4 / 2**20
    print(
        "\nNotes:\n\n"
        f"- Weights: {floor['weights_mib']:.0f} MiB (embedding and output head {VOCAB} × "
        f"{HIDDEN} each, untied). The 576 image positions are the model's own expansion of one "
        f"`-200` placeholder per row: a {IMAGE_SIZE}×{IMAGE_SIZE} RGB image in {PATCH_SIZE}×"
        f"{PATCH_SIZE} patches (LLaVA-1.5's CLIP-L/14-336 grid), `tiny_llava_config(image_size="
        f"{IMAGE_SIZE}, patch_size={PATCH_SIZE}, num_channels=3)`; intermediate size "
        f"{4 * HIDDEN}, 4 heads. Full logits: {logits_mib:.0f} MiB; the 128 supervised "
        f"positions' logits: {BATCH * ANSWER * VOCAB * 4 / 2**20:.0f} MiB.\n"
        "- Peak step memory: each configuration runs in a fresh process that builds the model "
        f"and runs one warm-up step (not counted). Before each of the {REPEATS} measured steps "
        "per process: `gc.collect()`, glibc `malloc_trim(0)`, read VmRSS, then reset the "
        "kernel's peak-RSS mark (write 5 to `/proc/self/clear_refs`); after the step, VmHWM − "
        "that RSS is the step's peak above the weights and everything else alive before it. "
        "Shown: the median over the measured steps and, in parentheses, their range (the steps "
        "are identical; the spread is the kernel's and the allocator's)"
        + (
            "."
            if reset
            else " (the peak mark could NOT be reset here: the figure is the process's peak "
            "since start minus the RSS before the step)."
        )
        + "\n"
        "- Step: Lightning, the validation step as `lightning.Trainer.validate` runs it "
        "(`inference_mode`), bracketed by a callback's `on_validation_batch_start`/`_end` "
        "(forward, metric updates and logging; not the loader or the epoch-end compute); "
        f"Trainer, one whole `trainer.evaluate()` on the 4-row eval set "
        f"(per_device_eval_batch_size={BATCH}, `batch_eval_metrics=True`, `no_grad`: loader, "
        "`prediction_step`, gather, `StreamingMetrics` update and compute, logging), with its "
        "`prediction_step` alone in parentheses (timed by wrapping the instance's method, "
        "nothing else changed). (b), the floor and the backbone row are bare calls under "
        "`torch.inference_mode()`; (b) includes its argmax, NLL and token-metric updates, the "
        "floor only the head's matmul on the 4 × 32 supervised positions (no argmax, no NLL).\n"
        f"- Times: median and range over the pooled steps. {', '.join(INTERLEAVED)} ran in "
        f"{ROUNDS} "
        "processes each, interleaved; the others in one. Load average (1 min) before / after "
        f"the run: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores (other "
        "processes on a shared machine inflate times, not memory).\n"
        "- Column '(a) of the same path ÷ this': Trainer rows against Trainer's (a), the other "
        "rows against Lightning's (a).\n"
        "- The NLL column (mean over the 128 supervised answer tokens) must agree across (a), "
        "(b) and (c): the same numbers are computed each way.\n"
        f"- Whole benchmark: {time.perf_counter() - started:.0f} s."
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main()
