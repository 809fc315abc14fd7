"""Lightning DDP (2 CPU processes, gloo) logs exactly the single-process values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

JOB = Path(__file__).with_name("lightning_ddp_job.py")


def _run(out_dir: Path, devices: int) -> list[dict]:
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(JOB.parent), *sys.path])}
    subprocess.run(
        [sys.executable, str(JOB), str(out_dir), str(devices)], env=env, check=True, timeout=300
    )
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(devices)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning-ddp")
    single, ddp = _run(root / "single", 1)[0], _run(root / "ddp", 2)
    return single, ddp, _records(root / "single"), _records(root / "ddp")


def _assert_same_values(ddp: dict, single: dict) -> None:
    assert ddp.keys() == single.keys()
    for name, value in single.items():
        if "loss" in name or "nll_sum" in name:  # a float sum added in another order
            assert ddp[name] == pytest.approx(value, rel=1e-6, nan_ok=True), name
        else:  # ratios of exact integer counts
            assert ddp[name] == value, name


def _records(run_dir: Path) -> dict[str, list[dict]]:
    folder = run_dir / "records"
    return {
        path.name: [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(folder.iterdir())
    }


def test_counts_summed_over_ranks_equal_the_single_process_counts(runs):
    single, ddp_ranks, _, _ = runs
    for rank in ddp_ranks:
        # Both validation epochs (in fit, then validate) see each of the 7 + 5 samples once:
        # the DistributedSampler's repeated samples are not counted.
        for epoch in ("epoch_2", "epoch_3"):
            counts = rank["counts"][epoch]
            assert counts["val_0/exact_match_total"] == 7 and counts["val_1/exact_match_total"] == 5
            _assert_same_values(counts, single["counts"][epoch])
        assert 0 < counts["val_0/bit_match_correct"] < counts["val_0/bit_match_total"]


def test_logged_values_equal_the_single_process_values(runs):
    single, ddp_ranks, _, _ = runs
    for rank in ddp_ranks:
        _assert_same_values(rank["fit"], single["fit"])
        assert len(rank["validate"]) == 2  # one result per dataloader
        for ddp_loader, single_loader in zip(rank["validate"], single["validate"], strict=True):
            _assert_same_values(ddp_loader, single_loader)


def test_group_counts_summed_over_ranks_equal_the_single_process_counts(runs):
    single, ddp_ranks, _, _ = runs
    for rank in ddp_ranks:
        counts = rank["counts"]["epoch_3"]
        # Groups by index % 3 % 2: samples 0..6 give 5 vqa and 2 ocr, 0..4 give 3 and 2; no chart.
        per_group = {
            key.split("/")[0]: value
            for key, value in counts.items()
            if "/exact_match_total_per_group_" in key
        }
        assert per_group == {"val_0": [5, 2, 0], "val_1": [3, 2, 0]}
        _assert_same_values(counts, single["counts"]["epoch_3"])
    assert "val/bit_match/vqa/dataloader_idx_0" in single["fit"]
    assert "val/gen_exact_match/dataloader_idx_0" in single["fit"]
    assert counts["val_0/gen_exact_match_total"] == 7  # every sample once
    assert counts["val_0/gen_bit_match_correct"] > 0
    assert "val/exact_match/macro/dataloader_idx_1" in single["fit"]


def test_records_files_equal_the_single_process_files(runs):
    _, _, single, ddp = runs
    # The sanity check writes nothing; fit's validation and validate() both run at step 2:
    # validate()'s files get "-2", nothing is overwritten.
    assert sorted(single) == [
        "val_step0000002_dl0-2.jsonl",
        "val_step0000002_dl0.jsonl",
        "val_step0000002_dl1-2.jsonl",
        "val_step0000002_dl1.jsonl",
    ]
    assert sorted(ddp) == sorted(single)
    for name in ("val_step0000002_dl0", "val_step0000002_dl1"):  # learning_rate=0: the same
        assert single[f"{name}.jsonl"] == single[f"{name}-2.jsonl"]
    for name, records in single.items():
        assert [r["index"] for r in records] == list(range(7 if "dl0" in name else 5))
        assert len(ddp[name]) == len(records), name  # every sample once: no repeat recorded
        for ddp_record, record in zip(ddp[name], records, strict=True):  # counts, strings
            assert {k: v for k, v in ddp_record.items() if k != "nll"} == {
                k: v for k, v in record.items() if k != "nll"
            }
        for ddp_record, record in zip(ddp[name], records, strict=True):
            # The same rows in other batches (other padding, other matrix shapes): float32
            # rounding of the row's summed NLL.
            assert ddp_record["nll"] == pytest.approx(record["nll"], rel=1e-6, abs=1e-6)
        assert [r["group"] for r in records] == [
            ("vqa", "ocr")[i % 3 % 2] for i in range(len(records))
        ]
