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
    return _run(root / "single", 1)[0], _run(root / "ddp", 2)


def _assert_same_values(ddp: dict, single: dict) -> None:
    assert ddp.keys() == single.keys()
    for name, value in single.items():
        if "loss" in name or "nll_sum" in name:  # a float sum added in another order
            assert ddp[name] == pytest.approx(value, rel=1e-6), name
        else:  # ratios of exact integer counts
            assert ddp[name] == value, name


def test_counts_summed_over_ranks_equal_the_single_process_counts(runs):
    single, ddp_ranks = runs
    for rank in ddp_ranks:
        # Both validation epochs (in fit, then validate) see each of the 7 + 5 samples once:
        # the DistributedSampler's repeated samples are not counted.
        for epoch in ("epoch_2", "epoch_3"):
            counts = rank["counts"][epoch]
            assert counts["val_0/exact_match_total"] == 7 and counts["val_1/exact_match_total"] == 5
            _assert_same_values(counts, single["counts"][epoch])
        assert 0 < counts["val_0/bit_match_correct"] < counts["val_0/bit_match_total"]


def test_logged_values_equal_the_single_process_values(runs):
    single, ddp_ranks = runs
    for rank in ddp_ranks:
        _assert_same_values(rank["fit"], single["fit"])
        assert len(rank["validate"]) == 2  # one result per dataloader
        for ddp_loader, single_loader in zip(rank["validate"], single["validate"], strict=True):
            _assert_same_values(ddp_loader, single_loader)
