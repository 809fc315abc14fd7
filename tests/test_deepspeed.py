"""Train, then evaluate, under DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes, torchrun, gloo):
Trainer's evaluation through the one evaluation core gives the independent reference's values and
records on the trained weights, and an eval set made to break lockstep does not hang.

The worker is `deepspeed_job.py`, launched once for the whole module (both stages). Its eval set
(7 rows, 2 per device, see its docstring) gives the two ranks, at the same step, different numbers
of head chunks and of greedy decoding steps, and rank 1 a text-only first batch (LLaVA's zero
image per row): under ZeRO-3 every forward is a collective, so the output head must be called
once per batch and decoding run the same number of steps on every rank. The reference
(`_parity.py`: full logits of the unsharded model in batches of 2 as Trainer forms them,
processed labels by hand, a batch-size-1 greedy loop recomputing the whole forward at each step)
is computed in this process, on the weights the job trained and gathered.

Needs `deepspeed` (CPU build: the job runs with `DS_ACCELERATOR=cpu`; the first run on a machine
builds DeepSpeed's shm communication op (C++ compiler and ninja; ~1 min here), cached in
~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _torchrun import run_on_two_processes

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from _parity import (  # noqa: E402
    MAX_NEW_TOKENS,
    assert_records_match,
    expected_samples,
    expected_with_counts,
    parity_collate,
    trainer_metrics,
)
from _reference import processed_labels_by_hand  # noqa: E402
from deepspeed_job import (  # noqa: E402
    CHUNK,
    MAX_STEPS,
    STAGES,
    deepspeed_model,
    deepspeed_rows,
    rows_digest,
    training_rows,
)

# Warm, the job takes ~1 min on 2 loaded cores; a fresh machine first builds DeepSpeed's op. A
# collective that one rank never joins fails the job after `COLLECTIVE_TIMEOUT_S` (120 s).
LAUNCH_TIMEOUT_S = 600
STAGE_IDS = [pytest.param(stage, id=f"zero{stage}") for stage in STAGES]
# Which rows each rank's evaluation batches hold: accelerate gives rank r the batches r, r + 2,
# ...; rank 1's last batch, [6], is completed with row 0 (dropped again by Trainer's gather).
BATCHES = {0: [[0, 1], [4, 5]], 1: [[2, 3], [6, 0]]}
# Keys of Trainer's own in evaluate()'s results: not metrics of ours.


def _launch(out_dir) -> list[dict]:
    return run_on_two_processes(
        "deepspeed_job.py", out_dir, timeout=LAUNCH_TIMEOUT_S, env={"DS_ACCELERATOR": "cpu"}
    )


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def ranks(out_dir) -> list[dict]:
    return _launch(out_dir)


@pytest.fixture(scope="module")
def eval_set():
    model = deepspeed_model()
    return model, deepspeed_rows(model)


def _trained_model(out_dir, stage: int):
    model = deepspeed_model()
    model.load_state_dict(torch.load(out_dir / f"trained_zero{stage}_rank0.pt"))
    return model


@pytest.fixture(scope="module")
def trained_samples(ranks, out_dir, eval_set) -> dict[int, list[dict]]:
    """The reference on the weights each stage trained (gathered by process 0)."""
    _, rows = eval_set
    return {stage: expected_samples(_trained_model(out_dir, stage), rows) for stage in STAGES}


def _records_of_process_zero(out_dir, stage: int) -> list[dict]:
    """The one records file, written by process 0; process 1's folder stays empty."""
    folder = out_dir / "records" / f"zero{stage}"
    assert sorted(path.name for path in folder.iterdir()) == ["rank0", "rank1"]
    assert list((folder / "rank1").iterdir()) == []
    [path] = (folder / "rank0").iterdir()
    assert path.name == f"eval_step{MAX_STEPS:07d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _batch(rows: list[dict], indices: list[int]) -> dict:
    return parity_collate([rows[i] for i in indices])


def test_the_job_trained_under_both_stages_on_two_gloo_processes(ranks, eval_set):
    _, rows = eval_set
    for results in ranks:
        assert results["world_size"] == 2 and results["backend"] == "gloo"
        assert results["rows"] == rows_digest(rows)  # the rows the reference is computed on
        assert results["training_rows"] == rows_digest(training_rows())
        for stage in STAGES:
            run = results[f"zero{stage}"]
            assert run["engine"] == "DeepSpeedEngine" and run["zero_stage"] == stage
            assert run["global_step"] == MAX_STEPS and len(run["losses"]) == MAX_STEPS
        # ZeRO-3 partitions every parameter (each rank holds an empty placeholder outside a
        # forward), and the library sees the model as sharded; ZeRO-2 keeps whole parameters.
        zero3, zero2 = results["zero3"], results["zero2"]
        assert zero3["is_sharded"] and not zero2["is_sharded"]
        assert all(p["ds_id"] and p["local_numel"] == 0 for p in zero3["partitioned"].values())
        assert not any(p["ds_id"] or p["local_numel"] == 0 for p in zero2["partitioned"].values())


def test_the_eval_set_gives_the_ranks_uneven_batches(ranks, eval_set, trained_samples):
    """What the lockstep is tested with: at each step the two ranks' batches need different
    numbers of head chunks (here 3 and 2, then 1 and 3); at the first step, rank 0's greedy
    answers all end at once while rank 1's go on (here 1 and 4 decoding steps); and rank 1's
    first batch is text-only (LLaVA's zero image per row, no placeholder)."""
    model, rows = eval_set
    for stage in STAGES:
        for rank, results in enumerate(ranks):
            batches = results[f"zero{stage}"]["probe"]["batches"]
            assert [b["input_ids"] for b in batches] == [
                _batch(rows, indices)["input_ids"].tolist() for indices in BATCHES[rank]
            ]
        text_only = ranks[1][f"zero{stage}"]["probe"]["batches"][0]
        assert all(token != -200 for row in text_only["input_ids"] for token in row)
        assert text_only["zero_images"] == [True, True]
        assert ranks[0][f"zero{stage}"]["probe"]["batches"][0]["zero_images"] == [False, False]

    def chunks(indices: list[int]) -> int:
        batch = {k: v for k, v in _batch(rows, indices).items() if k != "task"}
        supervised = int((processed_labels_by_hand(model, batch)[:, 1:] != -100).sum())
        return math.ceil(supervised / CHUNK)

    for first, second in zip(BATCHES[0], BATCHES[1]):
        assert chunks(first) != chunks(second), (first, second)
    for stage, samples in trained_samples.items():
        steps = [max(len(samples[i]["_answer"]) for i in BATCHES[rank][0]) for rank in (0, 1)]
        assert steps[0] == 1 < 4 <= steps[1], (stage, steps)


@pytest.mark.parametrize("stage", STAGE_IDS)
def test_every_rank_gets_the_reference_values_and_counts(stage, ranks, trained_samples):
    samples = trained_samples[stage]
    expected = expected_with_counts(samples)
    # The reference is not degenerate: hits and misses of every kind, a truncated row.
    assert {True, False, None} == {s["exact"] for s in samples}
    assert {True, False} == {s["gen_exact"] for s in samples}
    for results in ranks:
        evaluation = results[f"zero{stage}"]["evaluation"]
        assert "eval_loss" in evaluation  # Trainer's own, next to ours
        metrics = trainer_metrics(evaluation)
        # Exactly the expected keys: "chart" has no data, so no value at all.
        assert set(metrics) == {f"eval_{key}" for key in expected}
        # Raw counts exactly: 7 rows, not 8 (the duplicate), tokens neither doubled nor missing.
        assert metrics["eval_rows"] == 7
        for name in ("rows", "supervised_tokens", "correct_tokens"):
            assert metrics[f"eval_{name}"] == expected[name], name
        for key, value in expected.items():
            # Float32 rounding (~6e-8 relative per operation; seen: 3e-8): the ratios are float32
            # divisions of exact counts; the NLL comes from float32 logits computed in other
            # batches than the reference's (rank 1's [6, 0] padded vs [6]) and other kernels.
            assert metrics[f"eval_{key}"] == pytest.approx(value, rel=1e-6), key
    # Every process is handed every row: the same numbers, bit for bit.
    first, second = (trainer_metrics(results[f"zero{stage}"]["evaluation"]) for results in ranks)
    assert first == second


@pytest.mark.parametrize("stage", STAGE_IDS)
def test_process_zero_alone_writes_the_records_of_every_sample_once(
    stage, out_dir, ranks, trained_samples
):
    records = _records_of_process_zero(out_dir, stage)
    assert len(records) == 7  # not 8: the duplicate completing rank 1's last batch is dropped
    assert_records_match(records, trained_samples[stage])


@pytest.mark.parametrize("stage", STAGE_IDS)
def test_the_reference_uses_the_trained_weights_whole_and_equal_on_both_ranks(
    stage, out_dir, ranks, eval_set, trained_samples
):
    model, rows = eval_set
    initial = torch.load(out_dir / "initial.pt")
    weights = [torch.load(out_dir / f"trained_zero{stage}_rank{rank}.pt") for rank in range(2)]
    assert initial.keys() == model.state_dict().keys() == weights[0].keys() == weights[1].keys()
    for key, value in model.state_dict().items():
        assert torch.equal(initial[key], value), key  # the job started from the same weights
        assert weights[0][key].shape == value.shape, key  # whole, not a partition
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert any(not torch.equal(initial[key], weights[0][key]) for key in initial)
    # Training moved the reference far beyond the values' tolerance (rel 1e-6; seen: 8e-4): the
    # values above checked the trained weights, not the initial ones.
    before, after = (
        expected_with_counts(expected_samples(model, rows)),
        expected_with_counts(trained_samples[stage]),
    )
    assert after["nll"] != pytest.approx(before["nll"], rel=1e-4)


def test_zero3_calls_the_head_once_per_batch_and_decodes_in_lockstep(ranks):
    """Under ZeRO-3 every module call gathers its parameters (a collective): per batch, on every
    rank, one call of the head for all its chunks, then MAX_NEW_TOKENS decoding forwards, each
    with one head call, whatever the rank's rows."""
    for results in ranks:
        for batch in results["zero3"]["probe"]["batches"]:
            assert batch["root_calls"] == MAX_NEW_TOKENS
            assert batch["head"] == 1 + MAX_NEW_TOKENS
            assert batch["vision_tower"] == 2  # the split forward, the prompts' embeddings
    calls = (
        "head",
        "vision_tower",
        "embed_tokens",
        "root_calls",
        "before_decoding",
        "forward_collectives",
    )
    first, second = (
        [{name: batch[name] for name in calls} for batch in results["zero3"]["probe"]["batches"]]
        for results in ranks
    )
    assert first == second  # the same calls, and the same collectives, on both ranks


def test_zero2_decodes_each_batch_until_its_rows_end(ranks, eval_set, trained_samples):
    """ZeRO-2 keeps whole parameters: no lockstep, decoding stops when every row has ended, and
    the head is called once per chunk (so the ranks do differ, which lockstep must absorb)."""
    model, rows = eval_set
    samples = trained_samples[2]
    for rank, results in enumerate(ranks):
        for indices, batch in zip(BATCHES[rank], results["zero2"]["probe"]["batches"]):
            steps = max(len(samples[i]["_answer"]) for i in indices)
            data = {k: v for k, v in _batch(rows, indices).items() if k != "task"}
            supervised = int((processed_labels_by_hand(model, data)[:, 1:] != -100).sum())
            assert batch["root_calls"] == steps
            assert batch["head"] == math.ceil(supervised / CHUNK) + steps
            assert batch["forward_collectives"] == {}


@pytest.mark.parametrize("stage", STAGE_IDS)
@pytest.mark.parametrize("run", ["exposed", "plain"])
def test_every_evaluation_step_issues_the_same_collectives_on_both_ranks(stage, run, ranks):
    """Deterministic: every collective one rank issues must be matched by the other. The counts
    themselves (DeepSpeed's prefetch and trace checks, Trainer's gathers) are only reported."""
    probes = [
        results[f"zero{stage}"]["probe" if run == "exposed" else "plain"] for results in ranks
    ]
    probes = [probe if run == "exposed" else probe["probe"] for probe in probes]
    assert len(probes[0]["steps"]) == len(probes[1]["steps"]) == len(BATCHES[0])
    assert probes[0]["steps"] == probes[1]["steps"]
    forward = [[batch["forward_collectives"] for batch in probe["batches"]] for probe in probes]
    assert forward[0] == forward[1]
