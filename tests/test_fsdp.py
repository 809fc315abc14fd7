"""The supervised-only chunked head on a model sharded with FSDP2 (2 CPU processes, gloo).

``fully_shard`` is applied to each decoder layer, then to the root model, so outside the root's
forward the embeddings, vision tower, final norm and output head are shards (DTensors): the
split path (``aligned_hidden_states``, then the head on a few positions at a time) calls them
outside that forward. The worker is ``fsdp_job.py``; every rank feeds the same batches, so each
rank's ids, counts and NLL must equal the unsharded model's (computed in the same process before
sharding). Lightning's ``ModelParallelStrategy`` run splits the data as in real use; its synced
counts must equal the single-process ones.
"""

from __future__ import annotations

import pytest
import torch
from _torchrun import run_on_two_processes

pytest.importorskip("transformers")
pytest.importorskip("lightning.pytorch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not hasattr(fsdp, "register_fsdp_forward_method"):
    pytest.skip("this torch has no FSDP2 (`fully_shard`)", allow_module_level=True)

MODELS = ("llava", "llama", "llama_head_unit")


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory) -> list[dict]:
    return run_on_two_processes("fsdp_job.py", tmp_path_factory.mktemp("fsdp"))


def _counts(split: list[dict]) -> dict:
    """Raw counts over the batches, in plain Python, from ids and shifted labels."""
    counts = {"correct": 0, "supervised": 0, "hits": 0, "counted": 0, "nll": 0.0}
    for batch in split:
        for preds, target, nll in zip(batch["preds"], batch["target"], batch["row_nll"]):
            scored = [(p, t) for p, t in zip(preds, target) if t != -100]
            counts["correct"] += sum(p == t for p, t in scored)
            counts["supervised"] += len(scored)
            counts["counted"] += bool(scored)
            counts["hits"] += bool(scored) and all(p == t for p, t in scored)
            counts["nll"] += nll
    return counts


def _assert_same_split(sharded: list[dict], reference: list[dict]) -> None:
    assert len(sharded) == len(reference)
    for got, expected in zip(sharded, reference):
        assert got["target"] == expected["target"]
        assert got["preds"] == expected["preds"]  # also NOT_PREDICTED at the same positions
        assert got["row_nll"] == pytest.approx(expected["row_nll"], rel=1e-6)


def test_the_job_ran_on_two_sharded_processes(ranks_results):
    for results in ranks_results:
        assert results["world_size"] == 2 and results["backend"] == "gloo"
        for model in MODELS:  # every parameter was a shard before the first call
            assert results[model]["sharded"]["all_sharded_before"]


@pytest.mark.parametrize("model", MODELS)
def test_split_on_the_sharded_model_equals_the_unsharded_model(ranks_results, model):
    for results in ranks_results:
        reference, sharded = results[model]["reference"], results[model]["sharded"]
        counts = _counts(reference["split"])
        assert 0 < counts["correct"] < counts["supervised"], "degenerate batches"
        assert 0 < counts["hits"] < counts["counted"], "degenerate batches"
        # On the fresh model (FSDP not yet initialised by a root forward), then after forwards.
        _assert_same_split(sharded["split"], reference["split"])
        _assert_same_split(sharded["split_after_forwards"], reference["split"])


@pytest.mark.parametrize("model", MODELS)
def test_the_split_leaves_no_parameter_gathered(ranks_results, model):
    for results in ranks_results:
        assert results[model]["sharded"]["all_sharded_after_split"]


@pytest.mark.parametrize("model", MODELS)
def test_trainer_style_evaluation_equals_the_unsharded_model(ranks_results, model):
    for results in ranks_results:
        reference = results[model]["reference"]["trainer"]
        sharded = results[model]["sharded"]["trainer"]
        assert sharded["states"] == reference["states"]  # raw counts, exactly
        for name in ("bit_match", "exact_match", "supervised_tokens", "correct_tokens", "rows"):
            assert sharded["results"][name] == reference["results"][name], name
        assert sharded["results"]["nll"] == pytest.approx(reference["results"]["nll"], rel=1e-6)
        assert sharded["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        counts = _counts(results[model]["reference"]["split"])  # as the split path counts
        assert reference["states"]["correct_tokens"] == counts["correct"]
        assert reference["states"]["supervised_tokens"] == counts["supervised"]
        assert reference["states"]["exact_match_correct"] == counts["hits"]
        assert reference["states"]["exact_match_total"] == counts["counted"]


def test_llava_reference_matches_the_brute_force_counts(ranks_results):
    for results in ranks_results:
        brute = results["llava_brute_force"]
        states = results["llava"]["reference"]["trainer"]["states"]
        assert states["correct_tokens"] == brute["correct_tokens"]
        assert states["supervised_tokens"] == brute["supervised_tokens"]
        assert states["rows"] == brute["rows"]


def test_lightning_model_parallel_validate_equals_the_single_process_counts(ranks_results):
    for results in ranks_results:
        lightning = results["lightning"]
        expected = _counts(results["llava"]["reference"]["split"])
        single = results["llava"]["reference"]["trainer"]["results"]
        states = lightning["states"]  # summed over both ranks; each saw part of the data
        assert states["val_0/bit_match_correct"] == expected["correct"]
        assert states["val_0/bit_match_total"] == expected["supervised"]
        assert states["val_0/exact_match_correct"] == expected["hits"]
        assert states["val_0/exact_match_total"] == expected["counted"]
        assert states["val_0/nll_tokens"] == expected["supervised"]
        assert states["val_0/nll_sum"] == pytest.approx(expected["nll"], rel=1e-6)
        logged = lightning["logged"]
        assert logged["val/bit_match"] == single["bit_match"]
        assert logged["val/exact_match"] == single["exact_match"]
        assert logged["val/loss"] == pytest.approx(single["nll"], rel=1e-6)
        assert lightning["all_sharded"]
