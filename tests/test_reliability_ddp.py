"""Lightning DDP (2 CPU processes, gloo) counts exactly what one process counts, in the cases
where counting a DistributedSampler's repeats by their position in a process's stream fails:
pre-collated items of mixed sizes, batch samplers that reorder, the user's own sampler, several
loaders in one call, a rerun after an interrupted evaluation, a process with no batch, and
validation epochs whose repeats change with the epoch.

tests/reliability_ddp_job.py runs every scenario in one process and in two; see its docstring.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

from reliability_ddp_job import (  # noqa: E402 - after the skips
    A_BATCH_SIZES,
    A_SIZES,
    B_LOADERS,
    PRECOLLATED_ROWS,
)

JOB = Path(__file__).with_name("reliability_ddp_job.py")
# Each run takes about 15 s; a process left waiting for the other one must fail, not hang.
TIMEOUT_S = 120
INTERRUPTION = "interrupted at validation batch 2"

A_LOADERS = [
    *(f"{size}_samples_batch_{batch}" for size in A_SIZES for batch in A_BATCH_SIZES),
    *("precollated_" + "_".join(map(str, rows)) for rows in PRECOLLATED_ROWS),
    "shuffled",
]
D_LOADERS = ["7_samples", "5_samples"]
# step of the job -> its dataloaders, in order
LOADERS = {
    "A": A_LOADERS,
    "B": list(B_LOADERS),
    "D/reference": D_LOADERS,
    "D/validate_rerun": D_LOADERS,
    "D/fit_rerun": D_LOADERS,
    "D/fit_then_validate": D_LOADERS,
    "E": ["first_rank_only"],
    **{
        f"F/{sampler}/epoch_{epoch}": loaders
        for sampler, loaders in (
            ("lightning", ["7_samples_shuffled", "5_samples_fresh_permutation"]),
            ("users", ["7_samples_shuffled_sorted"]),
        )
        for epoch in range(2)
    },
}
# The steps that are a `trainer.validate` call (the others are fit's validation epochs).
VALIDATE_STEPS = [step for step in LOADERS if step != "D/fit_rerun" and step[0] != "F"]


@dataclass
class JobRun:
    devices: int
    returncode: int | None  # None: killed after TIMEOUT_S
    output: str
    ranks: list[dict]  # what each process wrote, up to its last finished scenario

    def step(self, name: str, rank: int = 0) -> dict:
        if name not in self.ranks[rank]:
            pytest.fail(
                f"The {self.devices}-process job recorded no {name!r} on rank {rank} (exit code "
                f"{self.returncode}); its output ends with:\n{self.output[-3000:]}"
            )
        return self.ranks[rank][name]


def _run(out_dir: Path, devices: int) -> JobRun:
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(JOB.parent), *sys.path])}
    command = [sys.executable, str(JOB), str(out_dir), str(devices)]
    # A session of its own: on a timeout, the process Lightning started goes too.
    with subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as job:
        try:
            output, _ = job.communicate(timeout=TIMEOUT_S)
            returncode = job.returncode
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            output, _ = job.communicate()
            returncode = None
    ranks = []
    for rank in range(devices):
        path = out_dir / f"rank{rank}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else {})
    return JobRun(devices, returncode, output, ranks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[JobRun, JobRun]:
    root = tmp_path_factory.mktemp("reliability-ddp")
    return _run(root / "single", 1), _run(root / "ddp", 2)


def _assert_same_counts(ddp: dict, single: dict, what: str) -> None:
    assert ddp.keys() == single.keys(), what
    for name, value in single.items():
        if name == "nll_sum":  # a float sum added in another order
            assert ddp[name] == pytest.approx(value, rel=1e-6), f"{what}: {name}"
        else:
            assert ddp[name] == value, f"{what}: {name} (all counts: {ddp} vs {single})"


def _assert_same_values(ddp: dict, single: dict, what: str) -> None:
    assert ddp.keys() == single.keys(), what
    for name, value in single.items():
        if "loss" in name:
            assert ddp[name] == pytest.approx(value, rel=1e-6), f"{what}: {name}"
        else:  # ratios of equal integer counts
            assert ddp[name] == value, f"{what}: {name}"


def test_both_jobs_finish(runs):
    """No process is left waiting for another (E: rank 1 has no batch at all)."""
    for run in runs:
        assert run.returncode is not None, (
            f"The {run.devices}-process job did not finish in {TIMEOUT_S} s:\n{run.output[-3000:]}"
        )
        assert run.returncode == 0, run.output[-3000:]
        assert "Connection closed by peer" not in run.output


@pytest.mark.parametrize(
    ("step", "index"),
    [(step, index) for step, names in LOADERS.items() for index in range(len(names))],
    ids=[f"{step}-{name}" for step, names in LOADERS.items() for name in names],
)
def test_synced_counts_equal_the_single_process_counts(runs, step, index):
    single_run, ddp_run = runs
    single = single_run.step(step)["counts"][index]
    expected = single_run.step(step)["expected"][index]
    # Every sample counted once: all answer tokens and every sample (each has an answer).
    assert single["exact_match_total"] == expected["samples"], single
    assert single["bit_match_total"] == single["nll_tokens"] == expected["tokens"], single
    for rank in range(2):
        ddp = ddp_run.step(step, rank)["counts"][index]
        _assert_same_counts(ddp, single, f"{step} {LOADERS[step][index]}, rank {rank}")


@pytest.mark.parametrize("step", list(LOADERS))
def test_counts_are_not_trivial(runs, step):
    counts = runs[0].step(step)["counts"]
    assert any(0 < c["bit_match_correct"] < c["bit_match_total"] for c in counts), counts
    if step != "E":  # E's one loader of 7 samples may have no exact answer at another release
        assert any(0 < c["exact_match_correct"] < c["exact_match_total"] for c in counts), counts


@pytest.mark.parametrize("step", VALIDATE_STEPS)
def test_validate_returns_the_single_process_values(runs, step):
    single_run, ddp_run = runs
    single = single_run.step(step)["validate"]
    assert len(single) == len(LOADERS[step])  # one result per dataloader
    for rank in range(2):
        ddp = ddp_run.step(step, rank)["validate"]
        assert len(ddp) == len(single)
        for index, (ddp_loader, single_loader) in enumerate(zip(ddp, single)):
            _assert_same_values(ddp_loader, single_loader, f"{step} loader {index}, rank {rank}")


def test_a_rerun_after_an_interrupted_evaluation_starts_from_zero(runs):
    for run in runs:
        for rank in range(run.devices):
            what = f"{run.devices} process(es), rank {rank}"
            for interrupted in ("D/validate_interrupted", "D/fit_interrupted"):
                # Every process raised, at the same batch, and no validation epoch ended.
                assert run.step(interrupted, rank) == {
                    "raised": INTERRUPTION,
                    "epochs_completed": 0,
                }, f"{interrupted}, {what}"
            reference = run.step("D/reference", rank)
            for rerun in ("D/validate_rerun", "D/fit_rerun", "D/fit_then_validate"):
                counts = run.step(rerun, rank)["counts"]
                for index, (got, expected) in enumerate(zip(counts, reference["counts"])):
                    _assert_same_counts(got, expected, f"{rerun} loader {index}, {what}")
            # What fit logged for its validation equals what validate() returned.
            logged = run.step("D/fit_rerun", rank)["logged"]
            returned = {k: v for loader in reference["validate"] for k, v in loader.items()}
            _assert_same_values(logged, returned, f"D/fit_rerun logged, {what}")


def test_length_sorting_puts_a_repeated_sample_inside_a_batch(runs):
    """B's sorted loaders really exercise a repeat that is not the last row of its batch."""
    inside = []
    for rank in range(2):
        step = runs[1].step("B", rank)
        for name, batches in step["batches"].items():
            for repeat in step["padding"][name]:
                inside += [name for batch in batches if repeat in batch[:-1]]
    assert sorted(inside) == ["sorted_5", "sorted_7"]


def test_the_library_warns_only_where_exactness_is_unknown(runs):
    single_run, ddp_run = runs
    for run in runs:
        for rank in range(run.devices):
            for step, recorded in run.ranks[rank].items():
                if run is ddp_run and step == "E":
                    continue
                ours = [message for message, own in recorded.get("warnings", []) if own]
                assert not ours, f"{step}, {run.devices} process(es), rank {rank}"
    # An IterableDataset is not sharded by Lightning: the library says it cannot vouch for it.
    ours = [message for message, own in ddp_run.step("E")["warnings"] if own]
    assert any("IterableDataset" in message for message in ours), ours


def test_each_validate_result_holds_only_its_dataloader_keys(runs):
    for index, result in enumerate(runs[0].step("A")["validate"]):
        assert all(key.endswith(f"/dataloader_idx_{index}") for key in result), sorted(result)
