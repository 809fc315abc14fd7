"""What every process must agree on, on 2 real processes (torchrun, gloo), against one process.

The worker is `ranks_job.py`, launched once for the whole module (with a timeout, and a process
group timeout inside, so a process left waiting fails the run instead of blocking it). The
single-process references are the same functions, run in this process with ``devices=1``.

1. Groups named in another order on each process (``groups=list(set(names))``, whose order
   follows each process's string hash seed; in the job, reversed on process 1): a group's slot
   (Lightning's all-reduced states) or position (Trainer's gathered group ids) then means
   another group on the other process, and every per-group value is scrambled. Every process
   must raise the clear error, and none may hang. With the same order everywhere, the values
   are the single-process ones.
2. The records' ``index`` under a batch sampler that reorders each batch by length: the file of
   2 processes must equal the file of 1, line for line, each line being the sample of that
   data-set index.
3. A ``records_dir`` that cannot be created: ``fit`` must fail at setup on every process with
   the error that names it, before any training step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

from _torchrun import run_on_two_processes  # noqa: E402 - after the skips
from ranks_job import (  # noqa: E402
    ANSWERS,
    GROUPS,
    SORTED_GROUPS,
    eval_rows,
    fit_with_records_dir,
    groups_of_rank,
    lightning_groups,
    lightning_records,
    trainer_evaluation,
)

# The job takes about 20 s on 2 free cores; a process left waiting fails after the process
# group's timeout (120 s): well within this.
TIMEOUT_S = 300
SAME_ORDER = "same groups in the same order"
# Keys of Trainer's own in evaluate()'s results: not metrics of ours.
NOT_METRICS = ("_loss", "_runtime", "_samples_per_second", "_steps_per_second", "_time")
RECORDS_FILE = "val_step0000000.jsonl"


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, list[dict]]:
    out_dir = tmp_path_factory.mktemp("ranks")
    return out_dir, run_on_two_processes("ranks_job.py", out_dir, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def ranks(job) -> list[dict]:
    return job[1]


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ranks_single")


def _value(case: dict) -> dict:
    """The value of a case that must not raise (with the error in the failure message)."""
    assert case["raised"] is None, f"{case['raised']}: {case['message']}"
    return case["value"]


def _groups_of_samples() -> list[str]:
    return [row["task"] for row in eval_rows()]


def _expected_denominators(groups: tuple[str, ...]) -> dict[str, list[int]]:
    """The per-group denominators, counted from the data set: supervised answer tokens (every
    answer survives, nothing is truncated) and rows with an answer."""
    tasks = _groups_of_samples()
    tokens = [sum(len(a) for a, t in zip(ANSWERS, tasks) if t == group) for group in groups]
    rows = [tasks.count(group) for group in groups]
    return {"bit_match": tokens, "exact_match": rows}


def _assert_same_counts(got: dict, want: dict) -> None:
    """Integer counts exactly; float NLL sums (added in another order) to float32 rounding."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        if "nll" in name or "loss" in name:
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
        else:
            assert got[name] == value, name


def test_the_job_ran_every_case_on_two_gloo_processes(ranks):
    for rank, results in enumerate(ranks):
        assert results["world_size"] == 2 and results["backend"] == "gloo"
        # Every case ran to its end on every process, the ones that raise included: no process
        # was left waiting for the other (the last barrier was reached by both).
        assert results["finished"] is True
        expected_cases = {
            "trainer_sorted",
            "trainer_reversed",
            "lightning_sorted",
            "records",
            "lightning_reversed",
            "bad_records_dir",
        }
        assert expected_cases <= set(results), rank


# ---- 1. groups in another order on each process --------------------------------------------


def test_the_job_names_the_groups_in_another_order_on_each_process():
    # What the scrambling needs: process 1's positions mean other groups than process 0's.
    first, second = groups_of_rank(0), groups_of_rank(1)
    assert sorted(first) == sorted(second) and first != second
    assert first[0] != second[0]  # slot 0 is "vqa" on one process, "chart" on the other
    assert SORTED_GROUPS != GROUPS  # the sorted case is not the unsorted one by chance


def test_trainer_raises_on_every_process_when_the_groups_are_in_another_order(ranks):
    """Before, each process's group ids (positions in its own list) were gathered together and
    counted as positions in the list of the process that computed: ``vqa`` rows of process 1
    counted as ``chart`` and so on, every per-group value scrambled, silently. Now the gathered
    header rows carry two different checksums, and every process (each handed every row)
    raises the same clear error at the first batch."""
    messages = []
    for results in ranks:
        case = results["trainer_reversed"]
        assert case["raised"] == "ValueError", case
        assert SAME_ORDER in case["message"]
        assert "sorted(set(names))" in case["message"]  # says what to do
        messages.append(case["message"])
    assert messages[0] == messages[1]  # the same gathered rows, the same error


def test_trainer_with_the_same_order_gives_the_single_process_values(ranks, single_dir):
    single = trainer_evaluation(SORTED_GROUPS, str(single_dir / "trainer"))
    denominators = _expected_denominators(SORTED_GROUPS)
    assert single["group_sums"]["bit_match"][1] == denominators["bit_match"]
    assert single["group_sums"]["exact_match"][1] == denominators["exact_match"]
    assert single["results"]["eval_rows"] == 7
    metrics = {}
    for rank, results in enumerate(ranks):
        value = _value(results["trainer_sorted"])
        # Raw per-group sums: numerators and denominators of every group, in the same slots.
        for name, (numerator, denominator) in single["group_sums"].items():
            got_numerator, got_denominator = value["group_sums"][name]
            assert got_denominator == denominator, (rank, name)
            assert got_numerator == pytest.approx(numerator, rel=1e-6, abs=1e-6), (rank, name)
        metrics[rank] = {
            key: v for key, v in value["results"].items() if not key.endswith(NOT_METRICS)
        }
        want = {k: v for k, v in single["results"].items() if not k.endswith(NOT_METRICS)}
        _assert_same_counts(metrics[rank], want)
        assert "eval_bit_match/vqa" in metrics[rank] and "eval_bit_match/chart" not in metrics[rank]
    assert metrics[0] == metrics[1]  # every process is handed every row: bit for bit


def test_lightning_raises_on_every_process_when_the_groups_are_in_another_order(ranks):
    """Before, the per-group states were all-reduced slot by slot: slot 0 summed process 0's
    ``vqa`` with process 1's ``chart``, and each process then logged the sums under its own
    names: scrambled values, different on each process. Now the first sync compares the
    checksums of the group lists and every process raises, at the same collective (the
    module's epoch end), so neither is left waiting (the job went on to the next case)."""
    for rank, results in enumerate(ranks):
        case = results["lightning_reversed"]
        assert case["raised"] == "ValueError", case
        assert SAME_ORDER in case["message"]
        # Each process names its own list.
        assert f"(this one: {list(groups_of_rank(rank))!r})" in case["message"]
        assert results["bad_records_dir"]["raised"] is not None  # the next case did run


def test_lightning_with_the_same_order_gives_the_single_process_values(ranks, single_dir):
    single = lightning_groups(SORTED_GROUPS, devices=1)
    denominators = _expected_denominators(SORTED_GROUPS)
    states = single["states"]
    [bit_total] = [v for k, v in states.items() if "bit_match_total_per_group" in k]
    [exact_total] = [v for k, v in states.items() if "exact_match_total_per_group" in k]
    assert bit_total == denominators["bit_match"]
    assert exact_total == denominators["exact_match"]
    for rank, results in enumerate(ranks):
        value = _value(results["lightning_sorted"])
        # Every state summed over the processes, the per-group slots included: the sampler's
        # repeat of row 0 on process 1 is not counted, and no slot holds another group.
        _assert_same_counts(value["states"], states)
        _assert_same_counts(value["logged"], single["logged"])
        assert "val/bit_match/ocr" in value["logged"], rank
    assert ranks[0]["lightning_sorted"]["value"] == ranks[1]["lightning_sorted"]["value"]


# ---- 2. records under a length-sorting batch sampler ---------------------------------------


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def single_records(single_dir) -> tuple[dict, list[dict]]:
    """The single-process run of case 2 (in this process): what it returned, and its file."""
    folder = single_dir / "records"
    single = lightning_records(folder, devices=1)
    assert [path.name for path in folder.iterdir()] == [RECORDS_FILE]
    return single, _read(folder / RECORDS_FILE)


def test_records_under_a_length_sorting_batch_sampler_equal_the_single_process_file(
    job, ranks, single_records
):
    """Before, one process numbered its samples in the order they arrived (here 1, 0, 3, 2,
    5, 4, 6: 6 of 7 lines differed from the data-set order) and two processes by data-set
    index, so the two files differed. Now both number them by data-set index."""
    out_dir, _ = job
    single, expected = single_records
    # The premise: the sampler does reorder, so arrival order is not the data-set order.
    arrival = [index for batch in single["batches"] for index in batch]
    assert arrival == [1, 0, 3, 2, 5, 4, 6]
    # Each line i is the sample of data-set index i (its reference is that sample's answer).
    assert [record["index"] for record in expected] == list(range(len(ANSWERS)))
    assert [record["reference"] for record in expected] == [
        " ".join(map(str, answer)) for answer in ANSWERS
    ]
    assert {True, False} == {record["exact"] for record in expected}  # not degenerate

    # On 2 processes: each drew its share, process 1 a repeat of sample 0, each batch sorted.
    drawn = [[index for batch in _value(r["records"])["batches"] for index in batch] for r in ranks]
    assert drawn == [[2, 0, 6, 4], [3, 1, 5, 0]]
    assert [path.name for path in (out_dir / "records").iterdir()] == [RECORDS_FILE]
    records = _read(out_dir / "records" / RECORDS_FILE)
    assert len(records) == len(expected)  # every sample once: the repeat is not recorded
    for got, want in zip(records, expected, strict=True):  # counts, flags, strings exactly
        assert {k: v for k, v in got.items() if k != "nll"} == {
            k: v for k, v in want.items() if k != "nll"
        }
    for got, want in zip(records, expected, strict=True):  # other batches: float32 rounding
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-6, abs=1e-6)
    for results in ranks:  # and the logged values are the single process's
        _assert_same_counts(_value(results["records"])["logged"], single["logged"])


def test_per_group_sums_are_the_records_summed_by_group(ranks, single_records):
    """An independent check of the grouped numerators: the single-process records (case 2,
    the same model and rows) summed by the group of each sample."""
    _, records = single_records
    tasks = _groups_of_samples()
    correct = [
        sum(r["correct_tokens"] for r, t in zip(records, tasks) if t == g) for g in SORTED_GROUPS
    ]
    exact = [sum(bool(r["exact"]) for r, t in zip(records, tasks) if t == g) for g in SORTED_GROUPS]
    for results in ranks:
        states = _value(results["lightning_sorted"])["states"]
        [bit_correct] = [v for k, v in states.items() if "bit_match_correct_per_group" in k]
        [exact_correct] = [v for k, v in states.items() if "exact_match_correct_per_group" in k]
        assert bit_correct == correct and exact_correct == exact
        sums = _value(results["trainer_sorted"])["group_sums"]
        assert sums["bit_match"][0] == correct and sums["exact_match"][0] == exact


# ---- 3. a records_dir that cannot be created ------------------------------------------------


def test_an_unwritable_records_dir_fails_fit_at_setup_on_every_process(ranks, single_dir):
    """Before, process 0 alone found the problem and raised, while process 1 went on into the
    next collective: "Connection closed by peer" there, a crash here. Now process 0's finding
    is broadcast at setup and every process raises the same clear error before any step."""
    blocker = single_dir / "not_a_directory"
    blocker.write_text("a regular file\n")
    single = fit_with_records_dir(blocker / "records", devices=1)
    assert single["raised"] == "ValueError"
    single_message = single["message"].replace(str(blocker / "records"), "<records_dir>")
    for rank, results in enumerate(ranks):
        case = results["bad_records_dir"]
        assert case["raised"] == "ValueError", (rank, case)
        assert "`records_dir`" in case["message"] and case["records_dir"] in case["message"]
        assert case["message"].replace(case["records_dir"], "<records_dir>") == single_message
        assert case["global_step"] == 0 and case["training_forwards"] == 0, rank
    assert single["global_step"] == 0 and single["training_forwards"] == 0
