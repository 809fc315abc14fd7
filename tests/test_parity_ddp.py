"""The parity eval set under real DDP (2 CPU processes, torchrun, gloo): Trainer's evaluation and
training over the one evaluation core give the independent reference's values and records.

The worker is `parity_ddp_job.py`, launched once for the whole module. 7 rows, 2 per device: the
second process's last batch is padded with a duplicate of row 0, which Trainer must drop (raw
counts show a duplicated row or a doubled all-reduce that a ratio would hide). The reference
(`_parity.py`: brute force, batches of 2 as Trainer forms them) is computed in this process, on
the initial weights and on the weights the job trained.
"""

from __future__ import annotations

import json

import pytest
import torch
from _torchrun import run_on_two_processes

pytest.importorskip("transformers")
from _parity import (  # noqa: E402
    assert_records_match,
    expected_samples,
    expected_with_counts,
    parity_model,
    parity_rows,
    trainer_metrics,
)
from parity_ddp_job import CHUNKS, MODES, TRAINING, eval_run_name  # noqa: E402

EVAL_RUNS = [
    pytest.param(eval_run_name(chunk, mode), id=f"{chunk}-{'per-batch' if mode else 'one-call'}")
    for chunk in CHUNKS
    for mode in MODES
]
# Keys of Trainer's own in evaluate()'s results: not metrics of ours.


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("parity_ddp")


@pytest.fixture(scope="module")
def ranks(out_dir) -> list[dict]:
    return run_on_two_processes("parity_ddp_job.py", out_dir)


@pytest.fixture(scope="module")
def eval_set():
    model = parity_model()
    rows = parity_rows(model)
    samples = expected_samples(model, rows)
    # The reference is not degenerate: hits and misses of every kind, a truncated row.
    assert {True, False, None} == {s["exact"] for s in samples}
    assert {True, False} == {s["gen_exact"] for s in samples}
    return model, rows, samples


@pytest.fixture(scope="module")
def trained_samples(ranks, out_dir, eval_set):
    """The reference on the weights process 0 trained (exposed run)."""
    _, rows, _ = eval_set
    model = parity_model()
    model.load_state_dict(torch.load(out_dir / "trained_rank0.pt"))
    return expected_samples(model, rows)


def _assert_values(results: dict, samples: list[dict], prefix: str) -> None:
    expected = expected_with_counts(samples)
    assert f"{prefix}loss" in results  # Trainer's own, next to ours
    metrics = trainer_metrics(results)
    # Exactly the expected keys: "chart" has no data, so no value at all.
    assert set(metrics) == {prefix + key for key in expected}
    assert not [key for key in results if key.endswith("/chart")]
    # Raw counts exactly: 7 rows, not 8 (the duplicate), tokens neither doubled nor missing.
    assert metrics[f"{prefix}rows"] == 7
    for name in ("rows", "supervised_tokens", "correct_tokens"):
        assert metrics[prefix + name] == expected[name], name
    for key, value in expected.items():
        rel = 1e-5 if key.startswith("nll") else 1e-6  # the NLL in float32, ratios of counts
        assert metrics[prefix + key] == pytest.approx(value, rel=rel), key


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _records_of_process_zero(out_dir, run: str, name: str) -> list[dict]:
    """The one records file, written by process 0; process 1's folder stays empty."""
    folder = out_dir / "records" / run
    assert sorted(path.name for path in folder.iterdir()) == ["rank0", "rank1"]
    assert list((folder / "rank1").iterdir()) == []
    [path] = (folder / "rank0").iterdir()
    assert path.name == name
    return _read(path)


def test_the_job_ran_on_two_gloo_processes_with_this_eval_set(ranks, eval_set):
    _, rows, _ = eval_set
    digest = [
        {
            "input_ids": row["input_ids"],
            "labels": row["labels"],
            "task": row["task"],
            "images": row["images"].flatten().tolist(),
        }
        for row in rows
    ]
    for results in ranks:
        assert results["world_size"] == 2 and results["backend"] == "gloo"
        assert results["rows"] == digest  # the rows the reference is computed on
        assert set(results["evaluations"]) == {run.values[0] for run in EVAL_RUNS}


@pytest.mark.parametrize("run", EVAL_RUNS)
def test_every_rank_gets_the_reference_values_and_counts(run, ranks, eval_set):
    _, _, samples = eval_set
    for results in ranks:
        _assert_values(results["evaluations"][run], samples, "dev_")
    # Every process is handed every row: the same numbers, bit for bit.
    first, second = (trainer_metrics(results["evaluations"][run]) for results in ranks)
    assert first == second


@pytest.mark.parametrize("run", EVAL_RUNS)
def test_process_zero_alone_writes_the_records_of_every_sample_once(run, out_dir, ranks, eval_set):
    _, _, samples = eval_set
    records = _records_of_process_zero(out_dir, run, "dev_step0000000.jsonl")
    assert len(records) == 7  # not 8: the duplicate padding process 1's last batch is dropped
    assert_records_match(records, samples)


def test_training_exposed_under_ddp_equals_training_without_the_exposure(ranks):
    """Trainer's DDP wraps the model with `find_unused_parameters=True` (a Hugging Face model,
    default arguments), whose forward rebuilds every output with PyTorch's pytree: the exposed
    training outputs carry `processed_labels`, and must be rebuilt with it.

    Exact equality is expected: the exposed training forward is the model's own forward on the
    same batch (the group key removed), the exposure only records the labels and adds an integer
    field, so every float operation, the gradients' all-reduce and the optimizer steps are the
    same, in the same order, on the same data order (the same seed)."""
    steps = TRAINING["max_steps"]
    for results in ranks:
        plain, exposed = results["plain"], results["exposed"]
        for run in (plain, exposed):
            assert run["wrapper"] == "DistributedDataParallel"
            assert run["find_unused_parameters"] is True
            assert run["global_step"] == steps
            assert run["steps"] == list(range(1, steps + 1))  # logging_steps=1
            assert len(run["forward_losses"]) == steps
        # The exposed training outputs did carry the field through DDP's rebuild.
        assert exposed["with_processed_labels"] == [True] * steps
        assert plain["with_processed_labels"] == [False] * steps
        # Logged (gathered) losses, gradient norms, and this process's own batch losses.
        assert exposed["losses"] == plain["losses"]
        assert exposed["grad_norms"] == plain["grad_norms"]
        assert exposed["forward_losses"] == plain["forward_losses"]
        # The trained weights, to the bit; and training did change them.
        assert results["exposed_vs_plain_weights"] == 0.0
        assert results["trained_vs_initial_weights"] > 0.0
    # Trainer logs the loss gathered over the processes: the same on both.
    assert ranks[0]["exposed"]["losses"] == ranks[1]["exposed"]["losses"]
    # Each process trained on its own batches.
    assert ranks[0]["exposed"]["forward_losses"] != ranks[1]["exposed"]["forward_losses"]


def test_the_trained_replicas_are_the_weights_the_reference_uses(out_dir, ranks, eval_set):
    model, _, _ = eval_set
    initial = torch.load(out_dir / "initial.pt")
    weights = [torch.load(out_dir / f"trained_rank{rank}.pt") for rank in range(2)]
    assert initial.keys() == model.state_dict().keys() == weights[0].keys() == weights[1].keys()
    for key, value in model.state_dict().items():
        assert torch.equal(initial[key], value), key  # the job started from the same weights
        assert torch.equal(weights[0][key], weights[1][key]), key  # DDP kept replicas equal
    assert any(not torch.equal(initial[key], weights[0][key]) for key in initial)


def test_evaluation_after_training_gives_the_reference_on_the_trained_weights(
    out_dir, ranks, eval_set, trained_samples
):
    _, _, samples = eval_set
    before, after = expected_with_counts(samples), expected_with_counts(trained_samples)
    # Training moved the reference: this checks the trained weights, not the initial ones.
    assert after["nll"] != pytest.approx(before["nll"], rel=1e-3)
    for results in ranks:
        _assert_values(results["trained_evaluation"], trained_samples, "eval_")
    first, second = (trainer_metrics(results["trained_evaluation"]) for results in ranks)
    assert first == second
    step = TRAINING["max_steps"]
    records = _records_of_process_zero(out_dir, "trained", f"eval_step{step:07d}.jsonl")
    assert len(records) == 7
    assert_records_match(records, trained_samples)
