"""The supervised-only chunked head on a model sharded with FSDP2 (2 CPU processes, gloo).

``fully_shard`` is applied to each decoder layer, then to the root model, so outside the root's
forward the embeddings, vision tower, final norm and output head are shards (DTensors): the
split path (``aligned_hidden_states``, then the head on a few positions at a time) calls them
outside that forward. The worker is ``fsdp_job.py``; every rank feeds the same batches, so each
rank's ids, counts and NLL must equal the unsharded model's (computed in the same process before
sharding). Lightning's ``ModelParallelStrategy`` run splits the data as in real use; its synced
counts must equal the single-process ones.

Generation under the same strategy (``generate_max_new_tokens``): a LLaVA-style model (the
library's cached loop, whose prompt embeddings need the root's vision tower and embeddings
outside the root's forward) and Hugging Face's Llava (its own ``generate``). Their answers,
records and logged ``gen_*`` values must equal a batch-size-1 greedy reference and the same
validation in one unsharded process (run here, in the pytest process), while the ranks, whose
batches end at different steps, make the same number of root forwards. The job finishing at
all shows that no rank was left waiting (each collective also times out in the job).
"""

from __future__ import annotations

import json

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
GENERATION = ("generation_llava_style", "generation_hf_llava")
# The one torchrun launch: ~20 s on an idle machine, ~50 s on a busy one (ranks out of step
# fail earlier, at the job's collective timeout).
JOB_TIMEOUT = 300


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory) -> list[dict]:
    return run_on_two_processes("fsdp_job.py", tmp_path_factory.mktemp("fsdp"), JOB_TIMEOUT)


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


# ---- generation ------------------------------------------------------------------------------


def _generated(ranks_results, model) -> list[dict]:
    """Each rank's generation results; the job's error, if it raised one, fails here."""
    if ranks_results[0][model] is None:
        pytest.skip("transformers 4.37's Llava expands <image> inside forward: tested on 5.x")
    for rank, results in enumerate(ranks_results):
        error = results[model]["error"]
        assert error is None, f"rank {rank} raised during the sharded validation:\n{error}"
    return [results[model] for results in ranks_results]


def _spelled(tokens) -> str:
    return " ".join(map(str, tokens))


def _steps_without_lockstep(greedy, batches) -> list[int]:
    """The decoding steps each batch needs on its own: until its last row's end token, or
    ``GEN_TOKENS`` (a row's greedy answer is cut after its end token)."""
    return [max(len(greedy[row]) for row in batch) for batch in batches]


def _validate_unsharded(model, records_dir) -> dict:
    """The same validation as the job's, in this process, on the model unsharded."""
    import fsdp_job
    import lightning.pytorch as pl
    from _hf_setup import SpellTokenizer, collate_hf_llava, collate_llava_style
    from torch.utils.data import DataLoader

    from mllm_metrics.lightning import MultimodalLMModule

    build, collate = {
        "generation_llava_style": (fsdp_job.generation_llava_style, collate_llava_style),
        "generation_hf_llava": (fsdp_job.generation_hf_llava, collate_hf_llava),
    }[model]
    network, rows, greedy = build()
    module = MultimodalLMModule(
        network,
        logits_chunk_size=fsdp_job.CHUNK,
        tokenizer=SpellTokenizer(),
        records_dir=records_dir,
        generate_max_new_tokens=fsdp_job.GEN_TOKENS,
        eos_token_id=fsdp_job.EOS,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    loader = DataLoader(rows, batch_size=2, collate_fn=collate)
    [logged] = trainer.validate(module, loader, verbose=False)
    lines = (records_dir / "val_step0000000.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {"logged": logged, "records": records, "greedy": greedy, "free": _free(network, rows)}


def _free(network, rows):
    """The library's decoding of some of ``rows`` as one batch on the unsharded model (no
    lockstep): the answers and the number of forwards it made."""
    from _hf_setup import collate_hf_llava, collate_llava_style
    from fsdp_job import EOS, GEN_TOKENS

    from mllm_metrics.generation import build_prompts, greedy_answers

    collate = collate_llava_style if "prompt" in rows[0] else collate_hf_llava

    def decode(indices):
        calls = []
        hook = network.register_forward_hook(lambda *args: calls.append(1))
        batch = collate([rows[i] for i in indices])
        try:
            with torch.no_grad():
                answers = greedy_answers(network, batch, build_prompts(batch), GEN_TOKENS, [EOS])
        finally:
            hook.remove()
        return answers, len(calls)

    return decode


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    results = {}

    def validate(model):
        if model not in results:
            results[model] = _validate_unsharded(model, tmp_path_factory.mktemp(model))
        return results[model]

    return validate


@pytest.mark.parametrize("model", GENERATION)
def test_sharded_generation_equals_the_batch_size_1_reference(ranks_results, model):
    from fsdp_job import EOS, GEN_TOKENS

    for result in _generated(ranks_results, model):
        greedy, answers = result["greedy"], result["answers"]
        records = result["records"]  # process 0 gathered every rank's samples
        assert [record["index"] for record in records] == list(range(len(answers)))
        # Each sample's answer, decoded by the spelling tokenizer, is the reference's.
        assert [record["generated"] for record in records] == [_spelled(g) for g in greedy]
        hits = [g == a for g, a in zip(greedy, answers)]
        assert [record["gen_exact"] for record in records] == hits
        correct = sum(sum(g == a for g, a in zip(gs, ans)) for gs, ans in zip(greedy, answers))
        total = sum(max(len(g), len(a)) for g, a in zip(greedy, answers))
        logged = result["logged"]  # synced over both ranks
        assert logged["val/gen_exact_match"] == pytest.approx(sum(hits) / len(hits), rel=1e-6)
        assert logged["val/gen_bit_match"] == pytest.approx(correct / total, rel=1e-6)
        # Not degenerate: hits and misses; rows that end at their end token at different
        # steps, and a row that runs to the last of the GEN_TOKENS steps.
        assert 0 < sum(hits) < len(hits)
        ended = {len(g) for g in greedy if g[-1] == EOS}
        assert len(ended) >= 3 and any(len(g) == GEN_TOKENS and EOS not in g for g in greedy)


@pytest.mark.parametrize("model", GENERATION)
def test_sharded_generation_equals_one_unsharded_process(ranks_results, unsharded, model):
    ranks = _generated(ranks_results, model)
    single = unsharded(model)
    assert single["greedy"] == ranks[0]["greedy"]  # the same model and rows here
    by_index = {record["index"]: record for record in single["records"]}
    for result in ranks:
        logged = result["logged"]
        assert {key for key in logged if "gen_" in key} == {
            "val/gen_bit_match",
            "val/gen_exact_match",
            "val/gen_text_bit_match",
            "val/gen_text_exact_match",
        }
        for key, value in single["logged"].items():
            if key == "val/loss":
                assert logged[key] == pytest.approx(value, rel=1e-6)
            else:  # ratios of synced counts: exactly the single process's
                assert logged[key] == value, key
        assert len(result["records"]) == len(single["records"])
        for record in result["records"]:
            expected = by_index[record["index"]]
            for field in ("generated", "gen_exact", "exact", "prediction", "reference"):
                assert record[field] == expected[field], (record["index"], field)


@pytest.mark.parametrize("model", GENERATION)
def test_ranks_make_the_same_root_forwards_while_their_batches_end_apart(
    ranks_results, unsharded, model
):
    from fsdp_job import GEN_TOKENS

    ranks = _generated(ranks_results, model)
    greedy = ranks[0]["greedy"]
    batches = [result["batches"] for result in ranks]
    # The DistributedSampler gave each rank half of the rows, 2 batches of 2.
    assert sorted(row for rank in batches for batch in rank for row in batch) == list(range(8))
    assert [len(rank) for rank in batches] == [2, 2]
    steps = [_steps_without_lockstep(greedy, rank) for rank in batches]
    # Uneven answers: the two ranks' batches would end at different steps, each rank has a
    # batch that would stop before GEN_TOKENS, and rows of one batch end at different steps.
    assert any(a != b for a, b in zip(*steps)), steps
    assert all(min(rank) < GEN_TOKENS for rank in steps), steps
    assert any(len({len(greedy[row]) for row in batch}) > 1 for rank in batches for batch in rank)
    # Which the library's decoding of each rank's batch on the unsharded model shows: it
    # stops there, with the same answers.
    for rank, rank_steps in zip(batches, steps):
        for batch, batch_steps in zip(rank, rank_steps):
            answers, forwards = unsharded(model)["free"](batch)
            assert answers == [greedy[row] for row in batch]
            assert forwards == batch_steps, (batch, forwards, batch_steps)
    assert all(result["fsdp_root"] for result in ranks)  # the hook counted the FSDP root's calls
    forwards = [result["forwards"] for result in ranks]
    assert forwards[0] == forwards[1], forwards  # the ranks in step
    if model == "generation_llava_style":
        # The library's loop on a sharded model: the prompt, then GEN_TOKENS - 1 tokens, on
        # every batch, whenever its rows end (the teacher-forced split and the prompt
        # embeddings run as registered forwards of the root, which no forward hook sees).
        assert forwards == [[GEN_TOKENS] * 2] * 2, (forwards, steps)
    else:
        # `generate(synced_gpus=True)`: every rank decodes until the rows of both have ended.
        expected = [max(a, b) for a, b in zip(*steps)]
        assert forwards == [expected] * 2, (forwards, steps)
        assert any(f > s for f, s in zip(forwards[0] + forwards[1], steps[0] + steps[1]))
