"""Tokens per second of ``update`` for the two token metrics, against torchmetrics and the floor.

    python benchmarks/update_throughput.py

"Floor" is one fused torch expression that computes the same four counts; our pair and the
torchmetrics pair (MulticlassAccuracy(average="micro") + MulticlassExactMatch) update on the
same inputs: token ids (8, 2048) and logits (8, 2048, 32000) (for torchmetrics, the transposed
view (8, 32000, 2048) it expects).
"""

from __future__ import annotations

import torch
from _common import header, table
from torch.utils.benchmark import Timer
from torchmetrics.classification import MulticlassAccuracy, MulticlassExactMatch

from mllm_metrics import BitMatchAccuracy, ExactMatchAccuracy, causal_lm_metrics

BATCH, LENGTH, VOCAB = 8, 2048, 32000


def floor_counts(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ids = preds.argmax(-1) if preds.ndim == 3 else preds
    supervised = target != -100
    wrong = (ids != target) & supervised
    counted = supervised.any(1)
    return (
        supervised.sum() - wrong.sum(),
        supervised.sum(),
        (counted & ~wrong.any(1)).sum(),
        counted.sum(),
    )


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(VOCAB, (BATCH, LENGTH), generator=generator)
    target[:, : LENGTH // 4] = -100  # the prompt
    ids = torch.where(torch.rand(BATCH, LENGTH, generator=generator) < 0.9, target.clamp(min=0), 0)
    logits = torch.randn(BATCH, LENGTH, VOCAB, generator=generator)
    ours = (BitMatchAccuracy(), ExactMatchAccuracy())
    ours_fast = (BitMatchAccuracy(validate_args=False), ExactMatchAccuracy(validate_args=False))
    collection = causal_lm_metrics()
    theirs = (
        MulticlassAccuracy(num_classes=VOCAB, average="micro", ignore_index=-100),
        MulticlassExactMatch(num_classes=VOCAB, ignore_index=-100),
    )
    rows = []
    for input_name, preds in (("ids (8, 2048)", ids), ("logits (8, 2048, 32000)", logits)):
        # torchmetrics wants the class dim second: the transpose is a view, not a copy.
        class_second = preds.transpose(1, 2) if preds.ndim == 3 else preds
        candidates = {
            "floor (one fused expression)": (lambda p: floor_counts(p, target), preds),
            "mllm-metrics: the two metrics": (lambda p: [m.update(p, target) for m in ours], preds),
            "mllm-metrics: the two, validate_args=False": (
                lambda p: [m.update(p, target) for m in ours_fast],
                preds,
            ),
            "mllm-metrics: causal_lm_metrics()": (lambda p: collection.update(p, target), preds),
            "torchmetrics pair": (lambda p: [m.update(p, target) for m in theirs], class_second),
        }
        timings = {
            name: Timer("run(p)", globals={"run": run, "p": p})
            .blocked_autorange(min_run_time=2.0)
            .median
            for name, (run, p) in candidates.items()
        }
        floor, torchmetrics_pair = (
            timings["floor (one fused expression)"],
            timings["torchmetrics pair"],
        )
        for name, seconds in timings.items():
            rows.append(
                [
                    input_name,
                    name,
                    f"{seconds * 1e3:.3f}",
                    f"{BATCH * LENGTH / seconds / 1e6:.2f}",
                    f"{torchmetrics_pair / seconds:.1f}×",
                    f"{seconds / floor:.2f}×",
                ]
            )
    print(header("Metric update throughput"))
    print(
        table(
            [
                "input",
                "update",
                "ms / batch",
                "M tokens/s",
                "speed-up vs torchmetrics",
                "time vs floor",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
