"""The evaluation core on its own: rows that are not samples of the eval set count nowhere.

The references are brute-force loops over the rows that are samples, and torchmetrics' own
metrics fed only those rows.
"""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassExactMatch

from mllm_metrics import BitMatchAccuracy
from mllm_metrics.evaluation import BatchResult, Evaluation

IGNORE = -100


def _batch(seed: int, rows: int = 5, length: int = 6, vocab: int = 4) -> BatchResult:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, vocab, (rows, length), generator=generator)
    target[torch.rand(rows, length, generator=generator) < 0.4] = IGNORE
    target[0] = IGNORE  # a row without labels: MulticlassExactMatch counts it a match
    preds = torch.randint(0, vocab, (rows, length), generator=generator)
    samples = torch.rand(rows, generator=generator) < 0.6
    samples[1] = False  # at least one repeat per batch
    return BatchResult(
        preds=preds,
        target=target,
        row_nll=torch.rand(rows, generator=generator, dtype=torch.float64),
        samples=samples,
        keys=[(100 * seed + row, 0) for row in range(rows)],
        group=torch.randint(0, 2, (rows,), generator=generator),
    )


def test_rows_that_are_not_samples_reach_no_metric_and_no_record():
    metrics = {
        "exact": MulticlassExactMatch(num_classes=4, ignore_index=IGNORE),
        "micro": MulticlassAccuracy(num_classes=4, average="micro", ignore_index=IGNORE),
        "bit_match": BitMatchAccuracy(),
    }
    evaluation = Evaluation(metrics, nll_key="nll", groups=["a", "b"], records=True)
    reference = {
        "exact": MulticlassExactMatch(num_classes=4, ignore_index=IGNORE),
        "micro": MulticlassAccuracy(num_classes=4, average="micro", ignore_index=IGNORE),
    }
    nll_sum, supervised, keys = 0.0, 0, []
    per_group = {0: [0, 0], 1: [0, 0]}  # group: [correct tokens, supervised tokens]
    for seed in range(6):
        batch = _batch(seed)
        evaluation.update(batch)
        for row in range(batch.rows):
            if not batch.samples[row]:
                continue
            labelled = batch.target[row] != IGNORE
            for metric in reference.values():
                metric.update(batch.preds[row : row + 1], batch.target[row : row + 1])
            nll_sum += batch.row_nll[row].item()
            supervised += int(labelled.sum())
            correct = int((batch.preds[row][labelled] == batch.target[row][labelled]).sum())
            per_group[int(batch.group[row])][0] += correct
            per_group[int(batch.group[row])][1] += int(labelled.sum())
            keys.append(batch.keys[row])
    values = evaluation.compute()
    for name, metric in reference.items():
        assert values[name].item() == pytest.approx(metric.compute().item(), abs=0)
    assert values["exact"].item() != 1.0  # the reference is not trivially satisfied
    assert values["nll"].item() == pytest.approx(nll_sum / supervised, rel=1e-6)
    for group, name in enumerate(["a", "b"]):
        correct, total = per_group[group]
        assert values[f"bit_match/{name}"].item() == pytest.approx(correct / total, rel=1e-6)
    # One record per sample, none for a repeat; the raw counts are the brute force's.
    evaluation.write_records(None)
    assert evaluation.last_records is not None
    assert len(evaluation.last_records) == len(keys)
    assert sum(r["supervised_tokens"] for r in evaluation.last_records) == supervised


def test_a_batch_of_repeats_only_changes_nothing():
    evaluation = Evaluation(
        {"exact": MulticlassExactMatch(num_classes=4, ignore_index=IGNORE)},
        nll_key="nll",
        records=True,
    )
    batch = _batch(0)
    batch.group = None
    evaluation.update(batch)
    before = {key: value.clone() for key, value in evaluation.compute().items()}
    repeats = _batch(1)
    repeats.samples = torch.zeros(repeats.rows, dtype=torch.bool)
    repeats.group = None
    evaluation.update(repeats)
    after = evaluation.compute()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    evaluation.write_records(None)
    assert evaluation.last_records is not None
    assert len(evaluation.last_records) == int(batch.samples.sum())
